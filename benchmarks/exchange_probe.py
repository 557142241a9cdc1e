"""What one dependent all-to-all exchange costs on this GPU, with nothing else in the way: the floor under every link
of the persistent action-expert kernel (kernels/mega_chain.py).

One persistent launch, one program per SM (co-resident), ROUNDS dependent rounds. In round r every program writes
its slice of a shared activation buffer (ping-pong) with ordinary stores, publishes it as mega_chain does (proxy
fence, a warpgroup barrier, one release fence, one relaxed add on its quarter's counter), then one thread polls the
counters (acquire loads) and bulk-copies the whole buffer into shared memory by quarters (cp.async.bulk + mbarrier,
each quarter as soon as its producers are in), and every thread waits for the bytes. What a program writes in round
r + 1 is computed from what it received in round r from another program's slice, so the rounds form one dependency
chain, and the end state is checked (every word == ROUNDS). BYTES = 0 leaves only the publish / poll round trip.

The buffer of 114 688 bytes is the persistent kernel's activation block (56 rows x 1024 bf16: what qkv, gate|up and
down take into every SM); 57 344 is o's K half, 28 672 a quarter.

    python benchmarks/exchange_probe.py [--bytes 0 28672 57344 114688] [--quarters 1 4] [--programs 120 132]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import statistics

import torch

from pi0_triton_policy.kernels.cluster_matmul import CUDA_HELPERS, HOPPER_HELPERS, compile_cuda, launch_raw

SRC = CUDA_HELPERS.replace("%%", "%") + HOPPER_HELPERS + r"""
extern "C" __global__ void __launch_bounds__(128, 1) exchange_kernel(unsigned* buf, unsigned* ctr,
        unsigned long long* ts, int* bad, int rounds, int programs, int bytes, int nq) {
    extern __shared__ __align__(1024) unsigned char smem[];
    unsigned* rx = (unsigned*)smem;                       /* the received buffer */
    const unsigned bars = smem_u32(smem + 114688);        /* one mbarrier per quarter */
    const int tid = threadIdx.x, prog = blockIdx.x;
    const int qbytes = bytes / nq, per_q = programs / nq;          /* producers per quarter */
    const int slice = (qbytes / per_q) & ~15;                      /* bytes a program writes */
    const int q = prog % nq, slot = prog / nq;
    const int my_off = q * qbytes + slot * slice;                  /* byte offset of my slice */
    const int nb = (prog + nq) % programs;                         /* whose slice my values come from */
    const int nb_off = (nb % nq) * qbytes + (nb / nq) * slice;
    if (tid < nq) mbar_init(bars + 8 * tid, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncthreads();
    for (int r = 0; r < rounds; ++r) {
        unsigned* out = buf + (size_t)(r & 1) * (114688 / 4);
        /* 1. my slice: each 16-byte chunk is the matching chunk of my neighbour's slice last round, + 1 */
        for (int c = tid; c < slice / 16; c += 128) {
            uint4 v = make_uint4(1, 1, 1, 1);
            if (r > 0) {
                v = *(const uint4*)(rx + (nb_off + 16 * c) / 4);
                v.x += 1; v.y += 1; v.z += 1; v.w += 1;
            }
            *(uint4*)(out + (my_off + 16 * c) / 4) = v;
        }
        /* 2. publish (mega_chain PUB 3): stores -> async-proxy readers, all threads' stores, one fence, relaxed add */
        asm volatile("fence.proxy.async.global;" ::: "memory");
        __syncthreads();
        if (tid == 0) {
            asm volatile("fence.acq_rel.gpu;" ::: "memory");
            asm volatile("red.relaxed.gpu.global.add.u32 [%0], 1;" :: "l"(ctr + r * nq + q) : "memory");
        }
        /* 3. the loader: each quarter once its producers are in */
        if (tid == 0) {
            for (int k = 0; k < nq; ++k) {
                const unsigned* c = ctr + r * nq + k;
                unsigned seen;
                do {
                    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(c) : "memory");
                } while (seen < (unsigned)per_q);
                if (bytes > 0) {
                    asm volatile("fence.proxy.async.global;" ::: "memory");
                    const unsigned bar = bars + 8 * k;
                    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(qbytes) : "memory");
                    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                                 :: "r"(smem_u32(smem) + k * qbytes), "l"((const char*)out + k * qbytes), "r"(qbytes), "r"(bar)
                                 : "memory");
                }
            }
        }
        /* 4. everyone waits for the bytes (the next round's stores read them) */
        if (bytes > 0)
            for (int k = 0; k < nq; ++k)
                while (!mbar_try(bars + 8 * k, r & 1)) {}
        else
            __syncthreads();
        if (tid == 0) ts[(size_t)prog * (rounds + 1) + r + 1] = globaltimer();
    }
    /* the chain's end state: every chunk of every slice == rounds */
    int wrong = 0;
    for (int c = tid; c < bytes / 16; c += 128) {
        const int off = 16 * c;
        if ((off % qbytes) / slice >= per_q) continue;  /* past the quarter's slices: nobody's */
        const uint4 v = *(const uint4*)(rx + off / 4);
        wrong += (v.x != (unsigned)rounds) + (v.y != (unsigned)rounds) + (v.z != (unsigned)rounds) + (v.w != (unsigned)rounds);
    }
    if (wrong) atomicAdd(bad, wrong);
}
"""

SMEM = 114688 + 64


@functools.lru_cache(maxsize=None)
def _kernel():
    return compile_cuda(SRC, "exchange_kernel", SMEM)


def run(programs: int, nbytes: int, nq: int, rounds: int) -> tuple[float, float, int]:
    """(us per round from the kernel's wall time, median us per round of the critical path from the stamps, wrong
    words at the end)."""
    dev = "cuda"
    buf = torch.zeros(2 * 114688 // 4, dtype=torch.int32, device=dev)
    ctr = torch.zeros(rounds * nq, dtype=torch.int32, device=dev)
    ts = torch.zeros(programs, rounds + 1, dtype=torch.int64, device=dev)
    bad = torch.zeros(1, dtype=torch.int32, device=dev)
    args = [ctypes.c_void_p(t.data_ptr()) for t in (buf, ctr, ts, bad)]
    args += [ctypes.c_int(rounds), ctypes.c_int(programs), ctypes.c_int(nbytes), ctypes.c_int(nq)]
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    launch_raw(_kernel(), programs, 128, SMEM, args)
    e.record()
    e.synchronize()
    wall = s.elapsed_time(e) * 1e3 / rounds
    ends = ts[:, 1:].double().max(dim=0).values  # the round's last program (ns)
    steps = (ends[1:] - ends[:-1]) / 1e3
    return wall, statistics.median(steps.tolist()), int(bad.item())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bytes", type=int, nargs="+", default=[0, 28672, 57344, 114688])
    ap.add_argument("--quarters", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--programs", type=int, nargs="+", default=[120, 132])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"card {torch.cuda.get_device_name()}  SMs {sms}")
    rows = []
    for p in args.programs:
        if p > sms:
            continue
        for nb in args.bytes:
            for nq in args.quarters:
                if p % nq or nb % (16 * nq) or (nb and (nb // nq // (p // nq)) < 16):
                    continue
                run(p, nb, nq, 20)  # compile / warm
                res = [run(p, nb, nq, args.rounds) for _ in range(args.repeats)]
                wall = statistics.median(r[0] for r in res)
                crit = statistics.median(r[1] for r in res)
                bad = max(r[2] for r in res)
                rows.append(dict(programs=p, bytes=nb, quarters=nq, us_per_round_wall=wall, us_per_round_stamps=crit,
                                 wrong_words=bad))
                print(f"programs {p:3d}  bytes {nb:6d}  quarters {nq}  us per round: wall {wall:6.2f}  "
                      f"stamps {crit:6.2f}  intake {nb / max(crit, 1e-9) / 1e3:6.1f} GB/s per SM  wrong {bad}",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
