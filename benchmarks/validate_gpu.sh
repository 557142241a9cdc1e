#!/usr/bin/env bash
# One device call: GPU tests + triton-vs-jax A/B on a converted full-size random checkpoint.
# Usage on the device machine (repo root, wheels carried in .whl/):  PI0_COMMIT=<sha> bash benchmarks/validate_gpu.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi -L | tee "$OUT/card.txt"
echo "== GPU tests (commit ${PI0_COMMIT:-unknown})"
[ -n "${SKIP_TESTS:-}" ] || python3 -m pytest -q -m gpu ${GPU_TESTS:-tests/} -p no:cacheprovider -s 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "rel err|passed|failed|error|Error" | tail -40
echo "== converted full-size random checkpoint"
python3 - <<'PY' 2>&1 | tail -3
import torch
from pi0_triton_policy.config import get_variant
import os
from pi0_triton_policy.weights import random_params, save_weights
cfg = get_variant(os.environ.get("VARIANT", "pi0"))
p = random_params(cfg, seed=0, device="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
m = save_weights("/tmp/w_pi0", {k: v.cpu() for k, v in p.items()}, cfg, source="random pi0, seed 0 (validate_gpu.sh)")
# A converted checkpoint carries its norm stats (ALOHA sim: 14-dim state/actions, OpenPI's JSON layout).
import json, os, numpy as np
rng = np.random.default_rng(0)
stats = {k: {"mean": rng.normal(0, 0.5, 14).tolist(), "std": rng.uniform(0.2, 1.5, 14).tolist(),
             "q01": (-np.ones(14)).tolist(), "q99": np.ones(14).tolist()} for k in ("state", "actions")}
d = "/tmp/w_pi0/assets/lerobot/aloha_sim_transfer_cube_human"
os.makedirs(d, exist_ok=True)
json.dump({"norm_stats": stats}, open(f"{d}/norm_stats.json", "w"))
import shutil
# the same weights as a pi0_aloha checkpoint (asset id trossen), sharing the tensor file
d2 = "/tmp/w_pi0_aloha/assets/trossen"
os.makedirs(d2, exist_ok=True)
json.dump({"norm_stats": stats}, open(f"{d2}/norm_stats.json", "w"))
for f in ("model.safetensors", "manifest.json"):
    if not os.path.exists(f"/tmp/w_pi0_aloha/{f}"):
        os.symlink(f"/tmp/w_pi0/{f}", f"/tmp/w_pi0_aloha/{f}")
# No real PaliGemma tokenizer can be downloaded here: a small SentencePiece model stands in (ids < vocab).
import sentencepiece as spm
text = "/tmp/sp_corpus.txt"
open(text, "w").write("\n".join(["Transfer cube", "pick up the red block", "open the drawer", "fold the towel"] * 50))
spm.SentencePieceTrainer.train(input=text, model_prefix="/tmp/w_pi0/paligemma_tokenizer", vocab_size=28,
                               model_type="unigram", bos_id=2, eos_id=1, pad_id=0, unk_id=3, minloglevel=2)
shutil.copy("/tmp/w_pi0/paligemma_tokenizer.model", "/tmp/w_pi0_aloha/paligemma_tokenizer.model")
print("wrote /tmp/w_pi0", m["num_params"], m["dtype"])
PY
echo "== A/B triton vs jax"
[ -n "${SKIP_AB:-}" ] || python3 scripts/ab_compare.py --a triton --b jax --weights /tmp/w_pi0 --config pi0_aloha_sim --num-obs 20 --variant pi0 \
    --out "$OUT/ab" --commit "${PI0_COMMIT:-unknown}" --no-progress 2>&1 | tee "$OUT/ab.log" | tail -45
echo "== serve_policy.py --backend triton + unmodified openpi_client over loopback (what a robot sees)"
python3 scripts/serve_policy.py --backend ${SERVE_BACKEND:-triton} --config pi0_aloha --weights /tmp/w_pi0_aloha --port 8765 > "$OUT/serve.log" 2>&1 &
SERVER=$!
python3 - <<'PY' 2>&1 | tee "$OUT/serve_client.log" | tail -8
import time, numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from pi0_triton_policy.policy import make_example_observation
for _ in range(600):  # the server captures its graphs and warms up before the port opens
    try:
        client = WebsocketClientPolicy("127.0.0.1", 8765); break
    except Exception:
        time.sleep(0.5)
print("metadata", client.get_server_metadata())
rng = np.random.default_rng(0)
obs = [make_example_observation("pi0_aloha", rng=rng) for _ in range(8)]  # 3 cameras 480x640 CHW, 14-dim state
rt, server_ms, policy_ms = [], [], []
for i in range(60):
    t = time.perf_counter(); out = client.infer(obs[i % 8]); rt.append((time.perf_counter() - t) * 1e3)
    server_ms.append(out["server_timing"]["infer_ms"]); policy_ms.append(out["policy_timing"]["infer_ms"])
rt, server_ms, policy_ms = (np.array(x[10:]) for x in (rt, server_ms, policy_ms))
print(f"actions {out['actions'].shape} {out['actions'].dtype}")
print(f"pi0_aloha (3 cameras), 50 requests after 10 warm-up: client round trip p50 {np.median(rt):.2f} ms p99 {np.percentile(rt, 99):.2f} ms; "
      f"server infer p50 {np.median(server_ms):.2f} ms; model p50 {np.median(policy_ms):.2f} ms")
PY
kill -TERM $SERVER; wait $SERVER; grep -E "ready|stopped" "$OUT/serve.log" | cut -c1-400
