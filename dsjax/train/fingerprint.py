"""Content fingerprints of arrays: cheap on device, exact on the host, equal across platforms and shardings.

Each array's bits are read as unsigned integers of its width (bfloat16/float16 -> uint16, float32/int32 ->
uint32, 8-bit types -> uint8; a 64-bit element is split into its low and high 32-bit words, in that order, and
counts as two elements), widened to uint32, and summed twice with 32-bit wraparound:

    s1 = sum(u)                      s2 = sum(u * (i * K + 1))       (i: the flat row-major index of u)

Integer sums with wraparound do not depend on the order of addition, so a jitted reduction over a sharded global
array (`fingerprints`) and a NumPy pass over slices read one at a time (`StreamingFingerprint`) give the same two
numbers on every platform. s2 weighs each element by its position, so moved or swapped values change it too.
A checkpoint stores them per array (dsjax/train/checkpoint.py); a read that does not reproduce them is corrupt.
"""

from __future__ import annotations

import math
import threading

import jax
import jax.numpy as jnp
import numpy as np

K = 0x9E3779B1  # odd (2^32 / golden ratio): distinct positions get distinct weights modulo 2^32
_MASK = (1 << 32) - 1
_CHUNK = 1 << 18  # elements per NumPy step: 1 MB buffers per thread, cache-sized (about 2 GB/s of bf16 a thread)
_WEIGHTS: list[np.ndarray] = []


def _index_weights() -> np.ndarray:
    if not _WEIGHTS:  # a benign race: two threads may both build the same table
        _WEIGHTS.append(np.arange(_CHUNK, dtype=np.uint32) * np.uint32(K))
    return _WEIGHTS[0]


def path_str(path) -> str:
    """A tree path as '/'-joined keys ('moe_layers/mlp/gate/kernel'; tuple and namedtuple entries by index/name)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _uint_dtype(dtype: np.dtype) -> np.dtype:
    """The unsigned type whose bits the fingerprint reads (64-bit types are read as uint32 pairs)."""
    size = np.dtype(dtype).itemsize
    if size not in (1, 2, 4, 8) or np.dtype(dtype).kind in "cOSUM":
        raise TypeError(f"cannot fingerprint arrays of dtype {np.dtype(dtype)}")
    return np.dtype({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[size])


def _device_words(x: jax.Array) -> jax.Array:
    """x's bits as uint32 values (one per element; two per 64-bit element, low word first)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    u = jax.lax.bitcast_convert_type(x, _uint_dtype(x.dtype))
    return u.astype(jnp.uint32)


def _device_fingerprint(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    u = _device_words(x)
    # i * K + 1 modulo 2^32 from per-axis iotas: no int64 index, so arrays past 2^32 elements work too
    weight = jnp.ones(u.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(u.ndim)):
        step = jnp.uint32(stride * K & _MASK)
        weight = weight + jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * step
        stride *= u.shape[axis]
    return jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * weight, dtype=jnp.uint32)


def _all_finite(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.bool_(True)


def _device_pass(leaves):
    """(n, 2) uint32 fingerprints and (n,) all-finite flags, in one program (one read of every array)."""
    sums = [jnp.stack(_device_fingerprint(x)) for x in leaves]
    finite = [_all_finite(x) for x in leaves]
    return jnp.stack(sums), jnp.stack(finite)


def _replicated(leaves):
    """A replicated output layout on the arrays' mesh, so every process of a multi-process run can read the
    result (None: let jit choose, which is fine on one process)."""
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return None


_JITTED: dict = {}  # one jitted pass per output layout; jit itself caches per tree structure and shapes


def _jitted(out_sharding):
    if out_sharding not in _JITTED:
        _JITTED[out_sharding] = jax.jit(_device_pass, out_shardings=out_sharding)
    return _JITTED[out_sharding]


def fingerprint_tree(tree) -> tuple[dict[str, list[int]], list[str]]:
    """({path: [s1, s2]}, paths of floating arrays holding a NaN or Inf) for every array leaf of `tree`.

    jax.Arrays (sharded global arrays included) are reduced on their devices in one jitted program, which also
    computes finiteness; NumPy leaves are done on the host (exactly, in their own dtype). Other leaves (Python
    scalars, None) have no fingerprint."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    on_device = [(path_str(p), x) for p, x in flat if isinstance(x, jax.Array)]
    on_host = [(path_str(p), x) for p, x in flat if isinstance(x, np.ndarray | np.generic)]
    out, not_finite = {}, []
    if on_device:
        leaves = [x for _, x in on_device]
        sums, finite = jax.device_get(_jitted(_replicated(leaves))(leaves))
        for (name, _), (s1, s2), ok in zip(on_device, np.asarray(sums), np.asarray(finite)):
            out[name] = [int(s1), int(s2)]
            if not ok:
                not_finite.append(name)
    for name, x in on_host:
        x = np.asarray(x)
        acc = StreamingFingerprint(x.shape, x.dtype)
        acc.add(x, 0)
        out[name] = acc.value()
        if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
            not_finite.append(name)
    order = {path_str(p): i for i, (p, _) in enumerate(flat)}
    return out, sorted(not_finite, key=order.get)


def fingerprints(tree) -> dict[str, list[int]]:
    """{'/'-joined tree path: [s1, s2]} for every array leaf of `tree` (see the module docstring)."""
    return fingerprint_tree(tree)[0]


class StreamingFingerprint:
    """The fingerprint of one array of `shape` and `dtype`, from slices added in any order and from any thread:
    `add(slice, flat_offset)` with the slice's first element's flat row-major index in the whole array (a unit
    `index` of leading axes starts at `np.ravel_multi_index(index + (0,) * rest, shape)`). `value()` equals
    `fingerprints` of the whole array once every element has been added exactly once (`complete`)."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        self.size = math.prod(self.shape)
        self._uint = _uint_dtype(self.dtype)
        self._words = 2 if self.dtype.itemsize == 8 else 1  # uint32 words per element
        self._s1 = self._s2 = 0
        self.added = 0  # elements added so far
        self._lock = threading.Lock()

    @property
    def complete(self) -> bool:
        return self.added == self.size

    def add(self, values, flat_offset: int) -> None:
        a = np.ascontiguousarray(values, dtype=self.dtype.newbyteorder("=")).reshape(-1)
        if a.size + flat_offset > self.size or flat_offset < 0:
            raise ValueError(f"slice of {a.size} elements at {flat_offset} exceeds an array of {self.size}")
        words = a.view(np.uint8) if a.dtype == np.bool_ else a.view(self._uint)
        base = flat_offset * self._words
        s1, s2 = int(words.sum(dtype=np.uint64)), 0
        step = _index_weights()  # j * K for j < _CHUNK, modulo 2^32
        u, w = np.empty(_CHUNK, np.uint32), np.empty(_CHUNK, np.uint32)  # reused: no allocation per chunk
        for start in range(0, words.size, _CHUNK):
            n = min(_CHUNK, words.size - start)
            np.copyto(u[:n], words[start : start + n], casting="unsafe")  # widen to uint32
            # weight of element i = i * K + 1 = (first * K + 1) + j * K, all modulo 2^32 (uint32 arithmetic wraps)
            np.add(step[:n], np.uint32(((base + start) * K + 1) & _MASK), out=w[:n])
            np.multiply(u[:n], w[:n], out=w[:n])
            s2 += int(w[:n].sum(dtype=np.uint64))
        with self._lock:
            self._s1 = (self._s1 + s1) & _MASK
            self._s2 = (self._s2 + s2) & _MASK
            self.added += a.size

    def value(self) -> list[int]:
        return [self._s1, self._s2]
