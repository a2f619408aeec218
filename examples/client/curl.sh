#!/bin/sh
# Call a structsim SimilarityService with curl from another pod, e.g.:
#   kubectl run simcurl --rm -i --restart=Never --image=curlimages/curl:8.11.1 --command -- \
#       sh -s -- http://similarity.default.svc < examples/client/curl.sh
# The URL is http://<SimilarityService name>.<namespace>.svc (status.endpoint of the resource).
# --retry retries 429/503 answers (overloaded, not ready yet), honouring their Retry-After.
set -eu
URL="${1:-${STRUCTSIM_URL:-http://similarity.default.svc}}"
CURL="curl -sS --fail-with-body --retry 3 --retry-max-time 30 -H Content-Type:application/json"

echo "ready:"
curl -sS --fail-with-body "$URL/readyz"
echo

echo "one pair:"
$CURL "$URL/v1/similarity" \
  -d '{"sentence1": "怎么修改登录密码", "sentence2": "如何更改账户密码"}'
echo

echo "batch:"
$CURL "$URL/v1/similarity/batch" \
  -d '{"pairs": [{"sentence1": "花呗可以提前还款吗", "sentence2": "花呗能不能提前还"},
                 {"sentence1": "快递几天能到", "sentence2": "退货运费谁承担"}]}'
echo

echo "rank:"
$CURL "$URL/v1/rank" \
  -d '{"source": "我的订单什么时候发货", "targets": ["订单多久发货", "怎么申请退款", "发货时间是多久"], "top_k": 2}'
echo
