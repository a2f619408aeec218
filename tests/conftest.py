"""Fixtures shared by every part's tests: a tiny synthetic checkpoint, an engine on it, Chinese pairs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# No GPU here: Triton kernels (similarity_service/latency_kernels.py) run in Triton's interpreter, which
# triton.jit picks when this is set before the kernels are defined (when latency_kernels is imported).
os.environ["TRITON_INTERPRET"] = "1"

if TYPE_CHECKING:  # the engine imports torch; only the fixtures that need it pay for that
    from similarity_service.runner import Engine

# Realistic Chinese pairs of varied length and kind (paraphrase, related, unrelated, long), written for
# these tests; none is among the checkpoint generator's calibration sentences.
CHINESE_PAIRS: list[tuple[str, str]] = [
    ("我的订单什么时候能发货？", "请问我买的东西哪天发出？"),
    ("怎么申请退货退款？", "退货流程是怎样的？"),
    ("密码忘了怎么办", "如何找回登录密码"),
    ("这款手机支持无线充电吗？", "这个型号能不能用无线充电器？"),
    ("运费是多少？", "寄到广州要多少邮费？"),
    ("可以用花呗分期付款吗", "支持分期付款吗"),
    ("快递能送到楼上吗？", "送货上门吗"),
    ("优惠券怎么使用？", "领到的券在哪里用？"),
    ("我要投诉快递员态度差", "送货的师傅态度很不好，我想投诉"),
    ("商品有质量问题可以换吗？", "收到的东西坏了能换新的吗？"),
    ("今天天气真好", "今天适合出去散步"),
    ("我喜欢吃苹果", "我不喜欢吃苹果"),
    ("北京是中国的首都", "上海是中国最大的城市"),
    ("如何办理护照？", "如何办理身份证？"),
    ("这家酒店离机场远吗？", "这家酒店有免费早餐吗？"),
    ("发票什么时候寄出？", "发票抬头写错了能改吗？"),
    ("会员可以打几折？", "会员卡丢了怎么补办？"),
    ("手机屏幕碎了", "我想学做红烧肉"),
    ("明天几点开会？", "这只猫好可爱"),
    ("怎么注销账号", "长城有多长"),
    ("好", "行"),
    ("在吗", "你好"),
    ("谢谢你的帮助", "不客气"),
    ("价格太贵了", "能不能便宜一点"),
    ("我想取消订单", "订单取消不了怎么办"),
    ("Apple Watch 可以测血压吗？", "苹果手表有没有血压监测功能？"),
    ("5G套餐每月多少钱", "五G套餐的月费是多少"),
    ("会议改到下午3点", "会议时间改成15:00了"),
    ("这个APP怎么下载", "在哪里可以下载这个应用程序"),
    ("请问ATM机在哪里？", "附近有取款机吗？"),
    ("我的银行卡被冻结了，怎么解冻？", "银行卡无法使用，显示账户冻结"),
    ("孩子咳嗽一个星期了还没好", "小朋友一直咳嗽要吃什么药"),
    ("高速公路节假日免费吗？", "国庆节走高速收费吗？"),
    ("这本书讲的是什么故事？", "这部小说的主要情节是什么？"),
    ("地铁末班车是几点？", "最后一班地铁几点发车？"),
    ("宽带突然断网了", "家里的网络连不上了"),
    ("怎样才能提高睡眠质量？", "晚上总是失眠怎么办？"),
    ("火锅", "麻辣烫"),
    ("猫", "狗"),
    ("机器学习", "深度学习"),
    (
        "我上个月在你们店里买了一台洗衣机，用了不到两个星期就开始漏水，联系了售后也没有人上门处理，请问现在应该怎么办？",
        "洗衣机买了没多久就漏水，售后一直不来修，我该怎么维权？",
    ),
    (
        "根据气象台发布的最新预报，受冷空气影响，本周后期我省大部分地区将出现明显降温，局部地区有小到中雨。",
        "天气预报说这周末要降温，还可能下雨。",
    ),
    (
        "公司决定从下个月起实行弹性工作制，员工可以在早上七点到十点之间任意时间到岗，只要保证每天工作满八小时即可。",
        "下个月开始上班时间变得灵活了，只要每天干够八个小时就行。",
    ),
    (
        "这款笔记本电脑搭载了最新一代处理器，内存为十六GB，固态硬盘容量为一TB，续航时间可以达到十二个小时，重量仅为一点二公斤。",
        "这台电脑的屏幕分辨率是多少？",
    ),
    (
        "近年来，随着互联网技术的快速发展，越来越多的人开始通过网络购物，这不仅改变了人们的消费习惯，也对传统零售业带来了巨大冲击。",
        "网购的普及让实体店的生意越来越难做了。",
    ),
    (
        "为了保护生态环境，市政府出台了新的垃圾分类管理办法，要求居民将生活垃圾分为可回收物、有害垃圾、厨余垃圾和其他垃圾四类投放。",
        "我家的小狗最近不爱吃饭，是不是生病了？",
    ),
    ("这件衣服可以机洗吗？", "这件衣服是什么材质的？"),
    ("外卖超时了能赔钱吗", "外卖送晚了有补偿吗"),
    ("房租每个月几号交？", "房租可以押一付三吗？"),
    ("驾照到期了怎么换证？", "驾驶证过期以后如何更换？"),
    ("流量用超了怎么收费", "超出套餐的流量怎么计费"),
    ("电视没有声音", "电视机的画面很模糊"),
    ("健身房办卡多少钱一年？", "游泳馆几点开门？"),
    ("我想把这首歌设置成手机铃声", "怎么给手机换一个来电铃声"),
    ("【通知】明天停水", "明天小区会停水吗？"),
    ("你们的客服电话是多少？？？", "客服热线号码是多少"),
    ("《红楼梦》的作者是谁", "红楼梦是谁写的"),
    ("1+1等于几", "一加一等于多少"),
    ("ＡＢＣ公司的股票涨了", "abc公司股价上涨"),
    ("Café 在哪里", "咖啡店在哪里"),
]


@pytest.fixture(scope="session", autouse=True)
def _no_implicit_event_loop() -> None:
    """looptime's plugin asks the event loop policy for a loop around every test. In a sync test
    that call creates a loop nobody closes, whose ResourceWarning then fails the next async test
    (warnings are errors). Marking the loop as explicitly unset makes the call raise instead, which
    looptime expects ("a sync test with no loop set"); pytest-asyncio sets its own loops anyway."""
    asyncio.set_event_loop(None)


@pytest.fixture(scope="session")
def chinese_pairs() -> list[tuple[str, str]]:
    """A few dozen realistic Chinese sentence pairs of varied length (copy before mutating)."""
    return list(CHINESE_PAIRS)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic StructBERT checkpoint (real on-disk format, random weights), made once per session."""
    from similarity_service.checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("models") / "structbert-tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path) -> Engine:
    """An fp32 CPU Engine on `tiny_model_dir`, shared by the session (the engine is thread-safe)."""
    from similarity_service.runner import Engine

    return Engine.load(tiny_model_dir, device="cpu", precision="fp32", max_batch_size=64)
