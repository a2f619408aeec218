"""Synthetic StructBERT sentence-similarity checkpoints, in the exact on-disk format of ModelScope's
`iic/nlp_structbert_sentence-similarity_chinese-base`: configuration.json, config.json,
pytorch_model.bin (Hugging Face BERT tensor names) and a 21128-line vocab.txt with real CJK characters.

The weights are random (deterministic from the seed), so the scores mean NOTHING semantically. One
thing is tuned: random BERT weights give every pair about the same P(similar), so the classifier
head is calibrated on a fixed set of Chinese pairs to spread the scores over [0, 1]; otherwise
thresholds never flip and precision accuracy guards are never exercised.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

from similarity_service.bert import BertConfig, BertSimilarity, hf_tensor_shapes
from similarity_service.tokenization import PairTokenizer

VOCAB_SIZE = 21128
# The label map of the real model: label "1" is "similar".
ID2LABEL = {"0": "0", "1": "1"}

SIZES: dict[str, dict[str, Any]] = {
    # BERT-base, as the real model, drawn as BERT initializes its weights.
    "base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "initializer_range": 0.02,
    },
    # Small enough for fast CPU tests; the vocabulary and positions stay full size. Its weights are
    # drawn wider than BERT's 0.02: two narrow random layers barely let [CLS] see the sentences, and
    # the head would need a huge scale (amplifying float rounding) to spread the scores.
    "tiny": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "initializer_range": 0.1,
    },
}

# The target spread of the calibrated logit (std over the calibration pairs): P(similar) = sigmoid(logit)
# then spans roughly 0.03-0.97.
TARGET_LOGIT_STD = 3.0
# Head weights are rounded to this step so the file's bytes do not depend on the last bits of the
# calibration forward (BLAS differs between CPUs).
HEAD_ROUNDING = 1e-4

# Realistic Chinese sentences for calibrating the head (not the tests' pairs, so tests measure the
# spread on pairs the calibration never saw). Pairs are formed from them deterministically.
CALIBRATION_SENTENCES = (
    "我的快递三天了还没到，能帮我查一下吗？",
    "包裹已经发出三天了，物流一直没有更新。",
    "怎么修改账户绑定的手机号码？",
    "绑定的手机号不用了，想换一个新的号码。",
    "退款申请提交以后多久能到账？",
    "这件衣服尺码偏小，可以换大一号吗？",
    "会员到期以后还能继续使用优惠券吗？",
    "今天北京的天气怎么样？",
    "明天上海会下雨吗，需要带伞吗？",
    "这家餐厅的招牌菜是什么？",
    "请问附近有没有可以停车的地方？",
    "我想预订下周五晚上两个人的位置。",
    "发票可以开成公司抬头吗？",
    "信用卡被盗刷了应该怎么办？",
    "银行卡丢失以后如何挂失？",
    "手机充不进电，是电池坏了吗？",
    "电脑开机以后一直黑屏，只有风扇在转。",
    "如何把照片从手机传到电脑上？",
    "孩子发烧到三十八度五，需要去医院吗？",
    "高铁票改签要收手续费吗？",
    "航班延误了可以申请什么补偿？",
    "这个月的电费为什么比上个月高那么多？",
    "小区的快递柜满了，快递员把包裹放在了门口。",
    "我们公司明年计划在华南地区再开三家门店。",
    "研究人员发现，适量运动可以明显改善睡眠质量。",
    "这部电影的结局太出乎意料了，我完全没想到。",
    "学习一门外语最重要的是坚持每天练习。",
    "周末我们一起去爬山吧，听说山顶的风景很好。",
    "新版本的应用在打开时经常闪退，希望尽快修复。",
    "订单显示已签收，但是我根本没有收到任何东西，请帮忙核实一下配送员是在什么时间、放在了哪里。",
    "根据最新发布的统计数据，今年前三季度全国居民人均可支配收入实际增长百分之五左右，消费支出也保持了稳定增长。",
    "为了保障用户的账户安全，系统检测到异地登录时会自动发送短信验证码，请勿将验证码告诉任何人。",
    "价格",
    "谢谢",
    "能便宜点吗",
    "什么时候发货",
    "iPhone 15 Pro 的电池续航怎么样？",
    "WiFi 密码忘记了怎么重置路由器？",
    "第3季度的销售额比去年同期增长了12.5%。",
    "请在2024年12月31日前完成年度体检。",
)


def build_vocab() -> list[str]:
    """The 21128 tokens of vocab.txt, in the layout of Google's Chinese BERT vocabulary.

    [PAD] 0, [unused1..99], [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, then punctuation, digits,
    lowercase ASCII letters, CJK punctuation and full-width forms, the 6,763 GB2312 hanzi, the Big5
    hanzi not among them (traditional characters), and `##` continuation pieces to fill.
    """
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(1, 100)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(string.punctuation + string.digits + string.ascii_lowercase)
    tokens += list("·×÷°±§¥£€©®™‰′″※–—‘’“”…‖→←↑↓①②③④⑤⑥⑦⑧⑨⑩■□▲△●○◆◇★☆²³")
    tokens += [
        chr(c) for c in (*range(0x3001, 0x3012), *range(0x3014, 0x301C))
    ]  # 、。〃〄々〆〇〈〉《》「」『』【】〔〕…
    full_width = [chr(c) for c in range(0xFF01, 0xFF5F) if not 0xFF21 <= c <= 0xFF3A]  # upper case is lowercased
    tokens += full_width
    hanzi = _gb2312_hanzi()
    seen = set(tokens) | set(hanzi)
    for char in _big5_hanzi():
        if char not in seen:
            seen.add(char)
            hanzi.append(char)
    tokens += hanzi
    # Continuations let words of letters and digits (ASCII or full-width: "iphone", "ｖｉｐ") split into pieces.
    pieces = [*string.digits, *string.ascii_lowercase, "²", "³", *full_width, *hanzi]
    tokens += [f"##{piece}" for piece in pieces][: VOCAB_SIZE - len(tokens)]
    assert len(tokens) == VOCAB_SIZE and len(set(tokens)) == VOCAB_SIZE
    return tokens


def _gb2312_hanzi() -> list[str]:
    """The 6,763 simplified characters of GB2312 (levels 1 and 2: everyday modern Chinese)."""
    return _decode_range("gb2312", range(0xB0, 0xF8), range(0xA1, 0xFF))


def _big5_hanzi() -> list[str]:
    """The traditional characters of Big5 (levels 1 and 2)."""
    return _decode_range("big5", range(0xA4, 0xFA), [*range(0x40, 0x7F), *range(0xA1, 0xFF)])


def _decode_range(codec: str, leads: range, trails: range | list[int]) -> list[str]:
    """The CJK Unified Ideographs of a double-byte codec, in code order (compatibility ideographs left out:
    the tokenizer's NFD normalization turns them into unified ones)."""
    chars = []
    for lead in leads:
        for trail in trails:
            try:
                char = bytes((lead, trail)).decode(codec)
            except UnicodeDecodeError:
                continue
            if "\u3400" <= char <= "\u9fff":
                chars.append(char)
    return chars


def model_config(size: Literal["tiny", "base"]) -> dict[str, Any]:
    """config.json of a StructBERT sentence-similarity model of the given size."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    return {
        "architectures": ["SbertForSequenceClassification"],
        "model_type": "structbert",
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        **SIZES[size],
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "vocab_size": VOCAB_SIZE,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "num_labels": 2,
        "id2label": ID2LABEL,
        "label2id": {label: int(index) for index, label in ID2LABEL.items()},
    }


def modelscope_configuration() -> dict[str, Any]:
    """configuration.json: what tells ModelScope's `Model.from_pretrained` and `pipeline` what this is."""
    preprocessor = {
        "type": "sen-sim-tokenizer",
        "first_sequence": "sentence1",
        "second_sequence": "sentence2",
        "label": "label",
    }
    return {
        "framework": "pytorch",
        "task": "sentence-similarity",
        "pipeline": {"type": "sentence-similarity"},
        "model": {"type": "structbert"},
        "preprocessor": {"train": dict(preprocessor), "val": dict(preprocessor)},
    }


def random_state_dict(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Hugging Face-named BERT weights drawn from one seeded generator, in a fixed order.

    Linear and embedding weights ~ N(0, initializer_range) as BERT initializes them; biases and LayerNorm
    parameters are random too (not 0 and 1) so a loader that mixes them up fails the parity test.
    """
    generator = torch.Generator().manual_seed(seed)
    std = config["initializer_range"]
    state: dict[str, torch.Tensor] = {}
    for name, shape in hf_tensor_shapes(BertConfig.from_dict(config)).items():
        noise = torch.randn(shape, generator=generator)
        if name.endswith("LayerNorm.weight"):
            state[name] = 1.0 + 0.1 * noise
        else:
            state[name] = std * noise
    state["bert.embeddings.position_ids"] = torch.arange(config["max_position_embeddings"]).unsqueeze(0)
    return state


def calibrate_head(state: dict[str, torch.Tensor], config: dict[str, Any], tokenizer: PairTokenizer) -> None:
    """Rewrite classifier.weight/bias in place so P(similar) spreads over [0, 1] on realistic pairs.

    The logit difference w·pooled + b is aimed along the direction in which the pooled outputs of the
    calibration pairs vary most (their first principal component), scaled to a logit std of
    TARGET_LOGIT_STD and centred at 0. Along the direction of most variance the needed scale is the
    smallest, so low-precision rounding noise is amplified the least. Both rows share a random common
    part, so a scorer that reads one row instead of the difference gets different answers.
    """
    bert_config = BertConfig.from_dict(config)
    model = BertSimilarity.from_hf_state_dict(bert_config, state, positive_label=1)
    sentences = CALIBRATION_SENTENCES
    count = len(sentences)
    pairs = [(sentences[i], sentences[(i * 7 + 3) % count]) for i in range(count)]
    pairs += [(sentences[i], sentences[(i + 1) % count]) for i in range(count)]
    pooled = _pooled_outputs(model, tokenizer, pairs).double()

    centred = pooled - pooled.mean(dim=0)
    _, _, components = torch.linalg.svd(centred, full_matrices=False)
    direction = components[0]
    direction = direction * torch.sign(direction[torch.argmax(direction.abs())])  # a fixed sign
    projection = pooled @ direction
    scale = TARGET_LOGIT_STD / float(projection.std())
    weight = scale * direction
    bias = -scale * float(projection.mean())

    common = state["classifier.weight"].double()[0]
    rows = torch.stack([common - weight / 2, common + weight / 2])
    state["classifier.weight"] = _round(rows)
    state["classifier.bias"] = _round(torch.tensor([-bias / 2, bias / 2], dtype=torch.float64))


def _pooled_outputs(model: BertSimilarity, tokenizer: PairTokenizer, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """The tanh pooler's output for each pair: one padded fp32 CPU batch (one call: fast even on a busy CPU)."""
    encoded = tokenizer.encode(pairs)
    length = max(len(item.input_ids) for item in encoded)
    ids = torch.zeros((len(encoded), length), dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, item in enumerate(encoded):
        count = len(item.input_ids)
        ids[row, :count] = torch.tensor(item.input_ids)
        types[row, :count] = torch.tensor(item.token_type_ids)
        mask[row, :count] = True
    with torch.inference_mode():
        return model.pooled(ids, types, mask)


def _round(tensor: torch.Tensor) -> torch.Tensor:
    return (torch.round(tensor / HEAD_ROUNDING) * HEAD_ROUNDING).float()


def make_checkpoint(out_dir: str | os.PathLike[str], size: Literal["tiny", "base"], seed: int = 0) -> Path:
    """Write a synthetic checkpoint into `out_dir` (created; its four files replaced) and return its path.

    The same size and seed give the same bytes. The directory appears complete or not at all when it
    did not exist before (files are written to a temporary sibling first).
    """
    out = Path(out_dir)
    config = model_config(size)
    vocab = build_vocab()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staging = Path(tmp)
        (staging / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        state = random_state_dict(config, seed)
        calibrate_head(state, config, PairTokenizer(staging))
        torch.save(state, staging / "pytorch_model.bin")
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (staging / "configuration.json").write_text(
            json.dumps(modelscope_configuration(), indent=2) + "\n", encoding="utf-8"
        )
        if not out.exists():
            staging.rename(out)
            out.chmod(0o755)  # TemporaryDirectory made it private
            staging.mkdir()  # TemporaryDirectory removes what is at its path on exit
        else:
            for item in staging.iterdir():
                shutil.move(item, out / item.name)
    return out
