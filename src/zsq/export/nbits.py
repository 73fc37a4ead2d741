"""Linear layers with <= 4-bit weights as ONNX Runtime's ``com.microsoft::MatMulNBits`` (issue 37 item 2).

ONNX Runtime 1.32 runs an INT4 ``DequantizeLinear -> MatMul`` in float (it dequantizes the weight on every
call); its 4-bit kernels are the contrib op ``MatMulNBits`` (CPU: MLAS ``SQNBitGemm``). The op computes
``Y = A @ dequant(B)^T (+ bias)`` with ``B`` an ``[N, K]`` weight quantized **block-wise along K**:
``block_size`` a power of two >= 16, one scale (float) and one 4-bit zero point per block and output
channel, ``dequant = (code - zero_point) * scale`` with unsigned codes 0..15 (zero point 8 when the
input is absent); ``B`` is ``uint8 [N, n_blocks, block_size / 2]``, two codes per byte, low nibble first,
``n_blocks = ceil(K / block_size)`` (the last block padded), scales ``[N * n_blocks]``, zero points
``uint8 [N, ceil(n_blocks / 2)]`` packed the same way (ContribOperators.md, ``MatMulNBits``).

zsq's weight grids map onto it **exactly**, without requantizing: a per-channel (or per-tensor) scale is
a block-wise one whose blocks of a row all carry the same scale and zero point, whatever the block size;
signed codes ``-8..7`` (symmetric grids, 2-4 bits) become ``code + 8`` with zero point ``z + 8``, unsigned
ones ``0..15`` keep theirs; the padding of the last block holds the zero point (it dequantizes to 0, and
ORT reads only ``K`` values). The block size is the largest power of two in 16..256 dividing K (K = 192:
64), else 32 with padding. With ``accuracy_level`` 0 (the default, not written) ORT computes in float32
from the dequantized weights: the same products as the QDQ graph, summed in another order.

:func:`to_matmulnbits` rewrites ``DequantizeLinear(W) -> Transpose -> MatMul [-> Add(bias)]`` (a Linear
applied to an N-d input, as the TorchScript exporter writes it) and ``DequantizeLinear(W) -> Gemm(transB=1)``
(a 2-d input) into one ``MatMulNBits`` with the bias as its input 5.
"""

from __future__ import annotations

import numpy as np

MS_DOMAIN = "com.microsoft"


def block_size_for(k: int) -> int:
    """The largest power of two in 16..256 dividing ``k``, else 32 (the last block padded)."""
    for b in (256, 128, 64, 32, 16):
        if k % b == 0:
            return b
    return 32


def pack_nbits(codes: np.ndarray, zp: np.ndarray, scale: np.ndarray, block: int):
    """(B uint8 [N, n_blocks, block/2], scales float32 [N * n_blocks], zero points uint8 [N, ceil(n_blocks/2)])
    of unsigned 4-bit ``codes`` [N, K] with one ``scale`` and zero point ``zp`` per row (``[N]``)."""
    n, k = codes.shape
    nb = -(-k // block)
    full = np.empty((n, nb * block), dtype=np.uint8)
    full[:, :k] = codes
    full[:, k:] = zp[:, None]  # padding dequantizes to 0 (ORT reads only K values anyway)
    full = full.reshape(n, nb, block)
    b = (full[..., 0::2] | (full[..., 1::2] << 4)).astype(np.uint8)
    scales = np.repeat(scale.astype(np.float32)[:, None], nb, axis=1).reshape(-1)
    zrow = np.repeat(zp.astype(np.uint8)[:, None], nb + (nb % 2), axis=1)
    zpk = (zrow[:, 0::2] | (zrow[:, 1::2] << 4)).astype(np.uint8)
    if nb % 2:  # the unused high nibble of the last byte: 0
        zpk[:, -1] &= 0x0F
    return b, scales, zpk


def to_matmulnbits(m, weights: dict, accuracy_level: int = 0) -> int:
    """Rewrite the Linear layers whose weight is the ``DequantizeLinear`` output named in ``weights``
    (``name -> (codes [N, K] float, scale [N] or scalar, zero point [N] or scalar, qmin, qmax)``) into
    ``MatMulNBits``; returns how many. Layers of another shape, or whose grid does not fit 4 unsigned bits,
    keep their QDQ weight. ``m`` (an ``onnx.ModelProto``) is changed in place."""
    from onnx import helper, numpy_helper

    from .ortint import remove_dead_nodes

    g = m.graph
    inits = {t.name: t for t in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    cons: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    replace: dict[int, object] = {}  # id(node) -> new node (None: drop)
    count = 0
    for n in g.node:
        if n.op_type == "MatMul":
            t = prod.get(n.input[1])
            if t is None or t.op_type != "Transpose" or t.input[0] not in weights:
                continue
            perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), [1, 0])
            if perm != [1, 0]:
                continue
            wname, out, bias, add = t.input[0], n.output[0], None, None
            readers = cons.get(out, [])
            if len(readers) == 1 and readers[0].op_type == "Add" and out not in outputs:
                a = readers[0]
                other = a.input[1] if a.input[0] == out else a.input[0]
                if other in inits and numpy_helper.to_array(inits[other]).ndim == 1:
                    bias, add = other, a
        elif n.op_type == "Gemm":
            attrs = {a.name: a for a in n.attribute}
            if (n.input[1] not in weights or "transA" in attrs and attrs["transA"].i
                    or not ("transB" in attrs and attrs["transB"].i)
                    or any(k in attrs and attrs[k].f != 1.0 for k in ("alpha", "beta"))):
                continue
            wname, t, add = n.input[1], None, None
            bias = n.input[2] if len(n.input) > 2 and n.input[2] in inits else None
            if len(n.input) > 2 and n.input[2] and bias is None:
                continue
        else:
            continue
        codes, s, z, qmin, qmax = weights[wname]
        shift = 8 if qmin < 0 else 0
        if qmin + shift < 0 or qmax + shift > 15:
            continue
        nrow, k = codes.shape
        s = np.broadcast_to(np.asarray(s, dtype=np.float32).reshape(-1), (nrow,))
        zu = np.broadcast_to(np.asarray(z).reshape(-1).astype(np.int64) + shift, (nrow,))
        if zu.min() < 0 or zu.max() > 15:
            continue
        block = block_size_for(k)
        b, scales, zpk = pack_nbits((codes.astype(np.int64) + shift).astype(np.uint8), zu.astype(np.uint8), s, block)
        base = wname.replace("/", "_").replace(".", "_").replace(":", "_").strip("_")
        names = [f"{base}_nbits_B", f"{base}_nbits_scales", f"{base}_nbits_zp"]
        g.initializer.append(numpy_helper.from_array(b, names[0]))
        g.initializer.append(numpy_helper.from_array(scales, names[1]))
        inputs = [n.input[0], names[0], names[1]]
        if (zu != 8).any():  # absent zero points mean 8 (a symmetric signed grid)
            g.initializer.append(numpy_helper.from_array(zpk, names[2]))
            inputs.append(names[2])
        if bias is not None:
            inputs += [""] * (5 - len(inputs)) + [bias]
        kw = {"accuracy_level": int(accuracy_level)} if accuracy_level else {}
        node = helper.make_node("MatMulNBits", inputs, [add.output[0] if add is not None else n.output[0]],
                                name=f"{base}_MatMulNBits", domain=MS_DOMAIN, K=k, N=nrow, bits=4,
                                block_size=block, **kw)
        replace[id(n)] = node
        if add is not None:
            replace[id(add)] = None
        count += 1
    if not count:
        return 0
    new_nodes = []
    for n in g.node:
        r = replace.get(id(n), n)
        if r is not None:
            new_nodes.append(r)
    del g.node[:]
    g.node.extend(new_nodes)
    if not any(o.domain == MS_DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    remove_dead_nodes(m)  # the Transposes and weight DequantizeLinears, then their initializers
    return count
