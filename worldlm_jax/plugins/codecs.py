"""Codecs: what a message becomes on a link of the tree, and how many bits it costs.

A federation's policy names the codec of each edge to its children, per
direction and per part: `codec_up` (what its children send it: their updates),
`codec_down` (what it broadcasts to them), each a name or a mapping
`{B: name, K: name}`, with `codec_args` (numbers; each codec takes the ones it
declares). The engine simulates the link inside the compiled round: the
receiver gets `roundtrip(message)`, what it would decode, and the bytes are
counted host-side from `bits` (payload plus scales and indices).

A codec is `roundtrip(x, key, args) -> x_hat` for ONE leaf of ONE message
(float32, any shape; the engine vmaps it over children and applies it leaf by
leaf, each leaf with its own key), and `bits(n, args) -> int`, the exact size
of that leaf's message when it holds n values. `args` are Python numbers at
trace time (a codec's arguments shape its message: block sizes, the number of
coordinates kept), so federations that differ in them run one variant each,
selected per node in the same program.

`feedback` (default per codec, `codec_args: {feedback: 0|1}` overrides it):
the sender keeps what was not sent and adds it to its next update (error
feedback, Seide et al. 2014; Karimireddy et al. 2019), per child and part,
in the engine state. Broadcasts need no such buffer: a federation sends the
difference between its parameters and the copy its children hold, so what a
lossy message left out is part of the next difference.

Built-ins (n values in a leaf, b = ceil(n / block) blocks):

| codec      | what is sent                                             | bits                        |
|------------|----------------------------------------------------------|-----------------------------|
| none       | float32                                                  | 32 n                        |
| bf16, fp16 | a cast (fp16 saturates at +-65504)                       | 16 n                        |
| int8, int4 | per block: round(x / s), s = max abs / (2^(bits-1) - 1)  | 8 n (4 n) + 32 b            |
| stochastic | random rotation (Hadamard with random signs) per block, then `bits`-bit stochastic rounding between the block's min and max: unbiased (Suresh et al. 2017) | bits x block x b + 64 b |
| topk       | the `fraction` of coordinates largest in magnitude, values and indices | k (32 + ceil(log2 n)), k = ceil(fraction n) |
| sign       | per block: sign(x) times the block's mean absolute value | n + 32 b                    |

The rotation's signs come from the round's key, which sender and receiver
both derive: no bits. Error feedback is on by default for topk, sign and int4.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from worldlm_jax.plugins.registry import Registry


@dataclasses.dataclass(frozen=True)
class Codec:
    roundtrip: Callable  # (x, key, args) -> x_hat, same shape and dtype: what the receiver decodes
    bits: Callable  # (n, args) -> int: the message's exact size for a leaf of n values
    args: Mapping[str, float] = dataclasses.field(default_factory=dict)  # argument -> default
    feedback: bool = False  # error feedback by default
    random: bool = False  # roundtrip draws from its key (the round then splits one off for it)


CODECS: Registry[Codec] = Registry("codec", "worldlm_jax.plugins.codecs.register(name, Codec(...))", Codec)
FEEDBACK_ARG = "feedback"  # every codec takes it: 1 keeps error feedback, 0 does not


def register(name: str, codec: Codec) -> Codec:
    """Add a codec usable by name in `codec_up` / `codec_down`."""
    if FEEDBACK_ARG in codec.args:
        raise ValueError(f"codec {name!r}: '{FEEDBACK_ARG}' is every codec's argument; declare it with "
                         "Codec(feedback=...)")
    return CODECS.register(name, codec)


def get(name: str, field: str = "codec") -> Codec:
    return CODECS.get(name, field)


def resolved_args(name: str, args: Mapping[str, float]) -> dict:
    """The arguments codec `name` runs with: its declared ones, a federation's
    `codec_args` over its defaults (arguments it does not declare are another
    codec's), and `feedback`."""
    codec = get(name)
    out = {a: args.get(a, default) for a, default in codec.args.items()}
    out[FEEDBACK_ARG] = float(args.get(FEEDBACK_ARG, float(codec.feedback)))
    return out


def uses_feedback(variant) -> bool:
    name, args = variant
    return name != "none" and dict(args)[FEEDBACK_ARG] > 0


def message_bits(variant, leaf_sizes) -> int:
    """Bits of one message of a part with leaves of `leaf_sizes` values through `variant`."""
    name, args = variant
    codec, args = get(name), dict(args)
    return sum(int(codec.bits(int(n), args)) for n in leaf_sizes)


# ---- the built-ins ---------------------------------------------------------------
def _blocks(x, block: int):
    """x flattened into (b, block) rows, zero-padded; and a function back."""
    flat = x.reshape(-1)
    n = flat.shape[0]
    b = -(-n // block)
    rows = jnp.pad(flat, (0, b * block - n)).reshape(b, block)
    return rows, lambda rows: rows.reshape(-1)[:n].reshape(x.shape).astype(x.dtype)


def _n_blocks(n: int, args) -> int:
    return -(-n // int(args["block"]))


def _cast(dtype, limit=None):
    def roundtrip(x, key, args):
        y = x if limit is None else jnp.clip(x, -limit, limit)
        return y.astype(dtype).astype(x.dtype)
    return roundtrip


def _integer(bits: int):
    """Symmetric per-block integers: round(x / s) in [-(2^(bits-1) - 1), 2^(bits-1) - 1]."""
    top = 2 ** (bits - 1) - 1

    def roundtrip(x, key, args):
        rows, back = _blocks(x, int(args["block"]))
        scale = jnp.max(jnp.abs(rows), axis=1, keepdims=True) / top
        q = jnp.clip(jnp.round(rows / jnp.where(scale > 0, scale, 1.0)), -top, top)
        return back(q * scale)
    return roundtrip


def _hadamard(rows):
    """Orthonormal Walsh-Hadamard transform of each row (length a power of two):
    log2(length) butterfly steps, its own inverse."""
    b, m = rows.shape
    h = 1
    while h < m:
        pairs = rows.reshape(b, m // (2 * h), 2, h)
        rows = jnp.stack([pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]], axis=2).reshape(b, m)
        h *= 2
    return rows / math.sqrt(m)


def _stochastic(x, key, args):
    """k-level stochastic rounding after a random rotation (unbiased: E[x_hat] = x)."""
    rows, back = _blocks(x, int(args["block"]))
    sign_key, round_key = jax.random.split(key)
    signs = jnp.where(jax.random.bernoulli(sign_key, 0.5, rows.shape), 1.0, -1.0)
    rotated = _hadamard(rows * signs)
    low = jnp.min(rotated, axis=1, keepdims=True)
    step = (jnp.max(rotated, axis=1, keepdims=True) - low) / (2 ** int(args["bits"]) - 1)
    position = (rotated - low) / jnp.where(step > 0, step, 1.0)
    floor = jnp.floor(position)
    level = floor + (jax.random.uniform(round_key, rows.shape) < position - floor)
    return back(_hadamard(low + level * step) * signs)


def _topk(x, key, args):
    flat = x.reshape(-1)
    k = _kept(flat.shape[0], args)
    _, index = jax.lax.top_k(jnp.abs(flat), k)
    return jnp.zeros_like(flat).at[index].set(flat[index]).reshape(x.shape)


def _kept(n: int, args) -> int:
    return max(1, min(n, math.ceil(args["fraction"] * n)))


def _sign(x, key, args):
    rows, back = _blocks(x, int(args["block"]))
    n = x.size
    # the mean over the block's real values (the last block's padding is not sent)
    counts = jnp.clip(n - jnp.arange(rows.shape[0]) * rows.shape[1], 0, rows.shape[1])[:, None]
    scale = jnp.sum(jnp.abs(rows), axis=1, keepdims=True) / counts
    return back(jnp.sign(rows) * scale)


register("none", Codec(roundtrip=lambda x, key, args: x, bits=lambda n, args: 32 * n))
register("bf16", Codec(roundtrip=_cast(jnp.bfloat16), bits=lambda n, args: 16 * n))
register("fp16", Codec(roundtrip=_cast(jnp.float16, limit=65504.0), bits=lambda n, args: 16 * n))
register("int8", Codec(roundtrip=_integer(8), bits=lambda n, args: 8 * n + 32 * _n_blocks(n, args),
                       args={"block": 256}))
register("int4", Codec(roundtrip=_integer(4), bits=lambda n, args: 4 * n + 32 * _n_blocks(n, args),
                       args={"block": 64}, feedback=True))
register("stochastic", Codec(
    roundtrip=_stochastic, random=True, args={"bits": 2, "block": 256},
    bits=lambda n, args: int(args["bits"]) * int(args["block"]) * _n_blocks(n, args) + 64 * _n_blocks(n, args)))
register("topk", Codec(roundtrip=_topk, args={"fraction": 0.01}, feedback=True,
                       bits=lambda n, args: _kept(n, args) * (32 + max(1, math.ceil(math.log2(n))))))
register("sign", Codec(roundtrip=_sign, bits=lambda n, args: n + 32 * _n_blocks(n, args), args={"block": 256},
                       feedback=True))


def check_args(name: str, args: Mapping[str, float]) -> str | None:
    """What is wrong with codec `name`'s arguments, or None."""
    a = resolved_args(name, args)
    if "block" in a and (a["block"] != int(a["block"]) or a["block"] < 1):
        return f"block = {a['block']!r}; expected an integer >= 1"
    if name == "stochastic" and (int(a["block"]) & (int(a["block"]) - 1)):
        return f"block = {a['block']!r}; the rotation needs a power of two"
    if "bits" in a and (a["bits"] != int(a["bits"]) or not 1 <= a["bits"] <= 16):
        return f"bits = {a['bits']!r}; expected an integer from 1 to 16"
    if "fraction" in a and not 0 < a["fraction"] <= 1:
        return f"fraction = {a['fraction']!r}; expected 0 < fraction <= 1"
    if a[FEEDBACK_ARG] not in (0, 1):
        return f"{FEEDBACK_ARG} = {a[FEEDBACK_ARG]!r}; expected 0 or 1"
    return None
