"""Pick the fastest K split per camera count from a vision_gemm_probe JSON: python choose_split.py probe.json OP1 OP2
-> [[s_op1, s_op2] per camera count] (1 = one mm), for Tuning.vis_res_split / pre_res_split."""
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
ops = sys.argv[2:]
out = []
for V in (1, 2, 3):
    pick = []
    for op in ops:
        rr = [x for x in rows if x["op"] == op and x["views"] == V and "us_per_call" in x]
        best = min(rr, key=lambda x: x["us_per_call"])
        pick.append(1 if best["impl"] == "cublas" else int(best["impl"].replace("cublas_split", "")))
    out.append(pick)
print(json.dumps(out))
