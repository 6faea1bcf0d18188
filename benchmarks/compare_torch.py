"""Workload W: the JAX engine vs a plain PyTorch FedAvg loop, in one process.

    .venv/bin/pip install torch==2.13.0      # optional extra, benchmarks only
    .venv/bin/python benchmarks/compare_torch.py

PyTorch side: torch.set_num_threads(2), clients trained one after another
(fresh AdamW each, same hyper-parameters as the engine's 'adamw'), FedAvg of
the final weights. Both start from the same weights (the flat JAX params dict
converted to torch) and see the same token blocks, so their first-round client
loss must agree to 1e-4 (printed as proof; the second round checks FedAvg).
Rounds are interleaved (JAX, torch, JAX, ...) so machine noise hits both alike.

--matmul-dtype bfloat16 runs the engine with model.matmul_dtype=bfloat16 (bf16
operands of the dense products, f32 accumulation and activations); --torch-autocast
runs the PyTorch loop under torch.autocast("cpu", dtype=torch.bfloat16) (which also
puts attention in bf16). Either way the first-round loss must still match to 1e-4.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def torch_model(cfg, params):
    """A plain nn.Module with the same architecture, loaded from the flat JAX params."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    d, H = cfg.d_model, cfg.n_heads

    def t(x, transpose=False):
        a = np.asarray(x, np.float32)
        return torch.tensor(a.T.copy() if transpose else a.copy())

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm = nn.LayerNorm(d, eps=1e-5)
            self.qkv = nn.Linear(d, 3 * d, bias=False)
            self.out = nn.Linear(d, d, bias=False)
            self.mlp_norm = nn.LayerNorm(d, eps=1e-5)
            self.up = nn.Linear(d, cfg.ff_dim, bias=False)
            self.down = nn.Linear(cfg.ff_dim, d, bias=False)

        def forward(self, x):
            B, L, _ = x.shape
            qkv = self.qkv(self.attn_norm(x)).view(B, L, 3, H, d // H).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
            x = x + self.out(y.transpose(1, 2).reshape(B, L, d))
            return x + self.down(F.gelu(self.up(self.mlp_norm(x)), approximate="tanh"))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(cfg.vocab_size, d)
            self.pos = nn.Embedding(cfg.max_len, d)
            self.blocks = nn.ModuleList([Block() for _ in range(cfg.n_layers)])
            self.final_norm = nn.LayerNorm(d, eps=1e-5)

        def forward(self, tokens):
            L = tokens.shape[1]
            h = self.embed(tokens) + self.pos(torch.arange(L))[None]
            for b in self.blocks:
                h = b(h)
            return self.final_norm(h) @ self.embed.weight.T  # tied head

    m = Decoder()
    sd = {"embed.weight": t(params["embed/embedding"]), "pos.weight": t(params["pos_embed/embedding"]),
          "final_norm.weight": t(params["final_norm/scale"]), "final_norm.bias": t(params["final_norm/bias"])}
    for i in range(cfg.n_layers):
        p = f"blocks/{i}/"
        sd.update({
            f"blocks.{i}.attn_norm.weight": t(params[p + "attn_norm/scale"]),
            f"blocks.{i}.attn_norm.bias": t(params[p + "attn_norm/bias"]),
            f"blocks.{i}.qkv.weight": t(params[p + "attn/qkv/kernel"], True),
            f"blocks.{i}.out.weight": t(params[p + "attn/out/kernel"], True),
            f"blocks.{i}.mlp_norm.weight": t(params[p + "mlp_norm/scale"]),
            f"blocks.{i}.mlp_norm.bias": t(params[p + "mlp_norm/bias"]),
            f"blocks.{i}.up.weight": t(params[p + "mlp/up/kernel"], True),
            f"blocks.{i}.down.weight": t(params[p + "mlp/down/kernel"], True),
        })
    m.load_state_dict(sd, strict=True)
    return m


class TorchFedAvg:
    """Sequential clients, fresh AdamW per client per round, FedAvg (server lr 1)."""

    def __init__(self, model, lr: float, autocast_bf16: bool = False):
        import contextlib

        import torch
        self.torch = torch
        self.model, self.lr = model, lr
        self.autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast_bf16 \
            else contextlib.nullcontext
        self.global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def run_round(self, tokens_SxExBxL1):
        torch = self.torch
        F = torch.nn.functional
        S, E = tokens_SxExBxL1.shape[:2]
        acc = {k: torch.zeros_like(v) for k, v in self.global_state.items()}
        losses = []
        for s in range(S):
            self.model.load_state_dict(self.global_state)
            opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, betas=(0.9, 0.95), eps=1e-8,
                                    weight_decay=0.1)
            client_loss = 0.0
            for e in range(E):
                tok = tokens_SxExBxL1[s, e]
                with self.autocast():
                    logits = self.model(tok[:, :-1])
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                client_loss += loss.item()
            losses.append(client_loss / E)
            with torch.no_grad():
                for k, v in self.model.state_dict().items():
                    acc[k] += v
        self.global_state = {k: v / S for k, v in acc.items()}
        return sum(losses) / len(losses)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=common.W["clients"])
    ap.add_argument("--steps", type=int, default=common.W["steps"])
    ap.add_argument("--devices", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunk", default="default")
    ap.add_argument("--eigen", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--matmul-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the engine's model.matmul_dtype")
    ap.add_argument("--torch-autocast", action="store_true",
                    help="PyTorch forward passes under CPU autocast to bfloat16")
    args = ap.parse_args(argv)

    common.configure(devices=args.devices, eigen_threads=args.eigen)
    from worldlm_jax.engine import parallel
    if args.matmul_dtype == "bfloat16":
        parallel.configure_cpu_bf16_matmuls()
    import jax
    import numpy as np
    import torch

    torch.set_num_threads(args.torch_threads)
    chunk = parallel.default_chunk() if args.chunk == "default" else int(args.chunk)
    w = common.build(clients=args.clients, steps=args.steps, preset="w", chunk=chunk, devices=args.devices,
                     matmul_dtype=args.matmul_dtype)
    cfg = w.model_def.config
    tokens = np.asarray(w.batch.tokens)[: args.clients]  # (S, E, B, L+1); padding slots dropped
    tm = torch_model(cfg, w.params)
    tfed = TorchFedAvg(tm, common.W["client_lr"], autocast_bf16=args.torch_autocast)
    ttok = torch.from_numpy(tokens.astype(np.int64))

    state = w.strategy.init(w.params)  # placed as the round returns it: one compilation
    key = jax.random.PRNGKey(1)
    jax_losses, torch_losses, jt, tt = [], [], [], []
    t0 = time.perf_counter()
    state, m, first = common.time_round(w, state, key)
    jax_losses.append(float(np.sum(m["train_loss_sum"]) / np.sum(m["train_clients"])))
    t = time.perf_counter()
    torch_losses.append(tfed.run_round(ttok))
    torch_first = time.perf_counter() - t
    state, m, _ = common.time_round(w, state, key)  # second warm-up for JAX (any recompile)
    jax_losses.append(float(np.sum(m["train_loss_sum"]) / np.sum(m["train_clients"])))
    torch_losses.append(tfed.run_round(ttok))
    for _ in range(args.rounds):
        state, m, dt = common.time_round(w, state, key)
        jt.append(dt)
        jax_losses.append(float(np.sum(m["train_loss_sum"]) / np.sum(m["train_clients"])))
        t = time.perf_counter()
        torch_losses.append(tfed.run_round(ttok))
        tt.append(time.perf_counter() - t)
    n = args.clients * args.steps
    jax_cps, torch_cps = n / common.median(jt), n / common.median(tt)
    diffs = [abs(a - b) for a, b in zip(jax_losses, torch_losses)]
    print(f"{'round':>5} {'JAX loss':>10} {'torch loss':>10} {'|diff|':>9} {'JAX s':>7} {'torch s':>7}")
    for r, (a, b) in enumerate(zip(jax_losses, torch_losses)):
        js = first if r == 0 else (float("nan") if r == 1 else jt[r - 2])
        ts = torch_first if r == 0 else (float("nan") if r == 1 else tt[r - 2])
        print(f"{r:>5} {a:10.6f} {b:10.6f} {abs(a - b):9.2e} {js:7.3f} {ts:7.3f}")
    tol = 1e-4
    ok = diffs[0] < tol
    print(f"first-round client loss: JAX {jax_losses[0]:.6f} vs PyTorch {torch_losses[0]:.6f} "
          f"(|diff| {diffs[0]:.2e}: {'MATCH' if ok else 'MISMATCH'} at {tol:g})")
    best_ratio = min(tt) / min(jt)
    print(f"client-steps/s (median rounds): JAX engine {jax_cps:.2f} vs PyTorch {torch_cps:.2f}: "
          f"ratio {jax_cps / torch_cps:.2f}; fastest rounds: ratio {best_ratio:.2f}")
    rec = {"workload": "W", "engine_client_steps_per_s": round(jax_cps, 2),
           "torch_client_steps_per_s": round(torch_cps, 2), "ratio": round(jax_cps / torch_cps, 3),
           "ratio_best_rounds": round(best_ratio, 3),
           "first_round_loss_jax": round(jax_losses[0], 6), "first_round_loss_torch": round(torch_losses[0], 6),
           "first_round_loss_absdiff": diffs[0], "max_loss_absdiff_all_rounds": max(diffs),
           "loss_match": ok, "loss_tolerance": tol, "matmul_dtype": args.matmul_dtype,
           "torch_autocast_bf16": args.torch_autocast, "jax_round_s_all": [round(x, 3) for x in jt],
           "torch_round_s_all": [round(x, 3) for x in tt], "devices": args.devices, "chunk": chunk,
           "torch_threads": args.torch_threads, "torch_version": torch.__version__, "jax_version": jax.__version__,
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "loadavg": os.getloadavg(),
           "compiles": int(w.strategy.run_round._cache_size()), "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(rec))
    return rec


if __name__ == "__main__":
    main()
