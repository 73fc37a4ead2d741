"""Sony MCT (model-compression-toolkit 2.6.1) on a zsq model: MCT's own data generation, then MCT PTQ
(optionally GPTQ on the same generated images), evaluated with zsq's loaders and top-1 code.

Run with the MCT venv (``bash bench/peers/setup.sh mct`` makes it)::

    OMP_NUM_THREADS=1 bench/peers/.venv-mct/bin/python bench/peers/mct_peer.py --w 4 --a 8 --seed 0 \
        --out /tmp/mct.json [--gptq] [--eval-limit 500 --gen-images 16 --gen-iters 20]

Bit widths. MCT takes its bit widths from a target platform capabilities (TPC) object; its default
(IMX500 TPC v1.0) is W8A8 with 8/4/2-bit weight candidates for mixed precision only. This script
builds a TPC with the same operator sets, fusing patterns and quantizer types as that default
(``imx500_tpc.v1_0.generate_tpc``: weights symmetric per channel, activations with power-of-two
thresholds) whose base configuration is W{w}A{a}, and lists 8-bit candidates beside it; MCT's
manual bit-width selection (``CoreConfig.bit_width_config``, ``BitWidthConfig.set_manual_*``) then
puts the first conv and the last FC's weights at 8 bits and the network input, the stem output,
the classifier input (last block output, pooling) and the logits at 8 bits. Mixed precision stays off (no resource utilization target), so every
other node gets the W{w}A{a} base configuration.

Mixed precision (``--mixed``, issue 38): MCT's own mixed-precision search
(``CoreConfig(mixed_precision_config=MixedPrecisionQuantizationConfig())``, MCT defaults) under
``ResourceUtilization(weights_memory=T)``, where T is the weight memory of the uniform W{w} layout as
MCT counts it (kernel bytes only: every Conv/Linear kernel at its bits / 8, the 8-bit first conv and last
FC included; no bias, no threshold). The kernels of the convolutions other than the first take their
bits from ``--mp-bits`` (default zsq's candidates 2,3,4,6,8; MCT's IMX500 TPC lists 2,4,8), activations
stay at A (the 8-bit ones as above), so only weight bits are searched. ``mixed`` in the JSON records the
target, MCT's chosen bits per layer, the resulting kernel bytes and the same model's weight memory as
zsq counts it (packed weights + two fp32 numbers per output channel + fp32 biases).
``--data-cache DIR`` keeps MCT's generated images per (model, seed, generation settings) so several bit
settings of one seed share one generation (the JSON records the generation's own time and load).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PEER_DIST = "model-compression-toolkit"

PROTOCOL_NOTE = (
    "MCT's own graph: BN folded, activations quantized at op outputs with power-of-two thresholds "
    "(zsq `fixed`: per-tensor asymmetric min-max / BN statistics), weights symmetric per channel "
    "(zsq: asymmetric); MCT also quantizes each block's second conv output before the residual add "
    "and the network input and logits (both 8 bits here); stem output, classifier input, first conv and last FC at 8 bits as in "
    "`fixed`; ranges from MCT-generated images (zsq `fixed` synthesis-free recipes use none)"
)


def build_tpc(w: int, a: int, act_method: str, mp_bits: list[int] | None = None):
    """IMX500 v1.0's operator sets and fusing with a W{w}A{a} base config and 8-bit candidates; with
    ``mp_bits`` (mixed precision) the kernel ops list every weight width of ``mp_bits`` at A{a} and A8."""
    import model_compression_toolkit.target_platform_capabilities.schema.mct_current_schema as schema
    from mct_quantizers import QuantizationMethod
    from model_compression_toolkit.constants import FLOAT_BITWIDTH
    from model_compression_toolkit.target_platform_capabilities.constants import BIAS_ATTR, KERNEL_ATTR
    from model_compression_toolkit.target_platform_capabilities.tpc_models.imx500_tpc.v1_0 import tpc as imx500

    act_q = {"power_of_two": QuantizationMethod.POWER_OF_TWO, "symmetric": QuantizationMethod.SYMMETRIC,
             "uniform": QuantizationMethod.UNIFORM}[act_method]
    supported_in = tuple(sorted({2, 3, 4, 5, 6, 7, 8, a}))

    def attr(bits, enabled, method=QuantizationMethod.SYMMETRIC, per_channel=True):
        return schema.AttributeQuantizationConfig(
            weights_quantization_method=method, weights_n_bits=bits, weights_per_channel_threshold=per_channel,
            enable_weights_quantization=enabled, lut_values_bitwidth=None)

    default_attr = attr(8, False, QuantizationMethod.POWER_OF_TWO, False)
    bias = attr(FLOAT_BITWIDTH, False, QuantizationMethod.POWER_OF_TWO, False)

    def op(wb, ab, with_kernel):
        return schema.OpQuantizationConfig(
            default_weight_attr_config=default_attr,
            attr_weights_configs_mapping={KERNEL_ATTR: attr(wb, True), BIAS_ATTR: bias} if with_kernel else {},
            activation_quantization_method=act_q, activation_n_bits=ab,
            supported_input_activation_n_bits=supported_in, enable_activation_quantization=True,
            quantization_preserving=False, fixed_scale=None, fixed_zero_point=None, simd_size=32,
            signedness=schema.Signedness.AUTO)

    if mp_bits:
        w_cands = sorted(set(mp_bits) | {8})
        base = op(w if w in w_cands else max(w_cands), a, True)
    else:
        w_cands = sorted({w, 8})
        base = op(w, a, True)
    # (A8 candidates only serve the manual 8-bit activations: with a weights-only memory target MCT's
    # mixed precision keeps every other node's activations at the base config's A{a})
    candidates = [base] + [o for o in (op(wb, ab, True) for wb in w_cands for ab in sorted({a, 8})) if o != base]
    default = op(8, a, False)
    tpc = imx500.generate_tpc(default_config=default, base_config=base, mixed_precision_cfg_list=candidates,
                              name=f"zsq_peer_imx500_v1_W{w}A{a}")
    # generate_tpc makes the default options from default_config alone: add the 8-bit activation
    # candidate so manual selection can put the classifier input / stem output at 8 bits.
    if a != 8:
        default_options = schema.QuantizationConfigOptions(quantization_configurations=(default, op(8, 8, False)),
                                                           base_config=default)
        ops = []
        for s in tpc.operator_set:
            if s.qc_options is None:
                ops.append(s)
            else:
                qco = s.qc_options
                if qco.base_config == default:  # ReLU, add, pool ... (default options)
                    qco = default_options
                ops.append(s.model_copy(update={"qc_options": qco}))
        tpc = tpc.model_copy(update={"operator_set": tuple(ops),
                                     "default_qco": default_options})
    return tpc


def kernel_layers(model) -> list[dict]:
    """Every Conv2d / Linear of the FP model in module order: name, kernel size, output channels and whether
    a BatchNorm follows it (folded: the folded layer has a bias)."""
    import torch
    from torch import fx

    graph = fx.symbolic_trace(model).graph
    mods = dict(model.named_modules())
    out = []
    for n in graph.nodes:
        if n.op == "call_module" and isinstance(mods[n.target], (torch.nn.Conv2d, torch.nn.Linear)):
            m = mods[n.target]
            bn = any(u.op == "call_module" and isinstance(mods.get(u.target), torch.nn.BatchNorm2d) for u in n.users)
            out.append({"fx": n.name, "module": n.target, "numel": m.weight.numel(), "out": m.weight.shape[0],
                        "bias": m.bias is not None or bn, "linear": isinstance(m, torch.nn.Linear)})
    return out


def weight_memory(layers: list[dict], bits: dict[str, int]) -> dict:
    """One layout's weight memory two ways. MCT (``ResourceUtilization.weights_memory``): the quantized kernels
    only, numel x bits / 8 (no bias, no threshold). zsq (``zsq.api.model_size``'s q_bytes): the packed
    kernels, ceil(numel x bits / 8) per layer, plus 8 bytes per output channel (fp32 scale and zero point)
    and the fp32 biases of the BN-folded model; BatchNorm parameters are folded away in both."""
    mct_b = sum(L["numel"] * bits[L["fx"]] / 8 for L in layers)
    packed = sum((L["numel"] * bits[L["fx"]] + 7) // 8 for L in layers)
    overhead = sum(8 * L["out"] + (4 * L["out"] if L["bias"] else 0) for L in layers)
    return {"mct_weights_memory": mct_b, "zsq_q_bytes": packed + overhead, "zsq_overhead_bytes": overhead}


def special_nodes(model) -> dict:
    """fx node names (= MCT graph node names) of the layers kept at 8 bits."""
    import torch
    from torch import fx

    graph = fx.symbolic_trace(model).graph
    inputs = [n.name for n in graph.nodes if n.op == "placeholder"]
    nodes = [n for n in graph.nodes if n.op == "call_module"]
    mods = dict(model.named_modules())
    kind = {n.name: type(mods[n.target]) for n in nodes}
    convs = [n for n in nodes if issubclass(kind[n.name], torch.nn.Conv2d)]
    linears = [n for n in nodes if issubclass(kind[n.name], torch.nn.Linear)]
    acts = (torch.nn.ReLU, torch.nn.ReLU6)
    first, last = convs[0].name, linears[-1].name
    # MCT folds a BN into the conv that feeds it and names the merged node "<conv>_bn"
    bn_types = (torch.nn.BatchNorm2d,)
    first_node = convs[0]
    folded = [u for u in first_node.users if u.op == "call_module" and issubclass(kind.get(u.name, type(None)), bn_types)]
    first_mct = f"{first}_bn" if len(first_node.users) == 1 and folded else first
    order = [n.name for n in nodes]
    stem_act = next(n for n in order[order.index(first):] if issubclass(kind[n], acts))
    # classifier input: the last activation before the last FC and any pooling in between
    before = order[:order.index(last)]
    last_act = next(n for n in reversed(before) if issubclass(kind[n], acts))
    tail = [n for n in before[before.index(last_act):]
            if issubclass(kind[n], acts + (torch.nn.AdaptiveAvgPool2d, torch.nn.AvgPool2d))]
    # the network input (MCT quantizes it), the stem output, the classifier input and the logits
    return {"w8": [first_mct, last], "a8": [*inputs, stem_act, *tail, last]}


def main() -> None:
    p = common.base_parser(__doc__.split("\n")[0])
    p.add_argument("--gen-images", type=int, default=256, help="images MCT generates (default %(default)s)")
    p.add_argument("--gen-iters", type=int, default=500, help="MCT data-generation iterations (default %(default)s)")
    p.add_argument("--gen-batch", type=int, default=32, help="data-generation batch size (MCT default %(default)s)")
    p.add_argument("--calib-batch", type=int, default=32, help="batch size of the representative data (default %(default)s)")
    p.add_argument("--gptq", action="store_true", help="GPTQ on the generated images after PTQ")
    p.add_argument("--gptq-epochs", type=int, default=25, help="GPTQ epochs (default %(default)s)")
    p.add_argument("--act-method", choices=("power_of_two", "symmetric", "uniform"), default="power_of_two",
                   help="activation quantizer (MCT default TPC: power_of_two)")
    p.add_argument("--mixed", action="store_true",
                   help="MCT mixed precision at the weight memory of uniform W{w} (see the module docstring)")
    p.add_argument("--mp-bits", default="2,3,4,6,8",
                   help="--mixed: weight-bit candidates of the searched layers (default %(default)s = zsq's; "
                        "MCT's IMX500 TPC: 2,4,8)")
    p.add_argument("--mp-images", type=int, default=None,
                   help="--mixed: images of MCT's sensitivity evaluation (default: MCT's own, 32)")
    p.add_argument("--data-cache", default=None,
                   help="folder keeping MCT's generated images per (model, seed, generation settings)")
    args = p.parse_args()
    mp_bits = sorted({int(b) for b in args.mp_bits.split(",") if b.strip()})
    if args.mixed and (not mp_bits or min(mp_bits) < 2 or max(mp_bits) > 8 or not min(mp_bits) <= args.w <= max(mp_bits)):
        p.error(f"--mp-bits {args.mp_bits}: bits within 2..8 that bracket --w {args.w}")
    common.setup_threads(args.threads)
    phases = common.Phases()

    with phases("load"):
        import torch
        import model_compression_toolkit as mct
        from model_compression_toolkit.core import BitWidthConfig, CoreConfig
        from model_compression_toolkit.core.common.network_editors import NodeNameFilter
        from model_compression_toolkit.target_platform_capabilities.constants import KERNEL_ATTR
        from zsq.record import model_info

        common.seed_everything(args.seed)
        model = common.load_fp_model(args.model)
        pre = model_info(model).preprocess
        size = pre.input_size
        eval_path = common.asset(args.eval)
        layers = kernel_layers(model)
        # the layers kept at 8 bits (special_nodes' "w8"): the first conv and the last linear
        pinned = {layers[0]["fx"], [L for L in layers if L["linear"]][-1]["fx"]}
        # the weight memory of uniform W{w} (pinned layers at 8): MCT's target and zsq's count of it
        mp_target = weight_memory(layers, {L["fx"]: 8 if L["fx"] in pinned else args.w for L in layers})

    # 1. MCT's data generation (its defaults apart from the image count / iterations / batch), or the
    # images an earlier run of the same model, seed and settings generated (--data-cache)
    cache_file = gen_cached = None
    if args.data_cache:
        cache_file = Path(args.data_cache) / (f"mct_gen__{args.model}__s{args.seed}__"
                                              f"{args.gen_images}x{args.gen_iters}x{args.gen_batch}.pt")
    with phases("data_generation"):
        if cache_file is not None and cache_file.is_file():
            blob = torch.load(cache_file, map_location="cpu")
            images, gen_cached = blob["images"], blob["made"]
        else:
            common.seed_everything(args.seed)
            dg_cfg = mct.data_generation.get_pytorch_data_generation_config(
                n_iter=args.gen_iters, data_gen_batch_size=args.gen_batch)
            images = mct.data_generation.pytorch_data_generation_experimental(
                model=model, n_images=args.gen_images, output_image_size=size, data_generation_config=dg_cfg)
            images = torch.cat([t.detach().cpu() for t in images]) if isinstance(images, list) else images.cpu()
    if cache_file is not None and gen_cached is None:
        made = {"wall_s": phases.wall["data_generation"], "cpu_s": phases.cpu["data_generation"],
                "load_avg": phases.load_avg, "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        torch.save({"images": images, "made": made}, tmp)
        os.replace(tmp, cache_file)
    if gen_cached is not None:
        # this row's data cost is the generation's, measured when the images were made
        phases.wall["data_generation"], phases.cpu["data_generation"] = gen_cached["wall_s"], gen_cached["cpu_s"]

    def repr_data():
        for i in range(0, len(images), args.calib_batch):
            yield [images[i:i + args.calib_batch]]

    # 2. PTQ (or GPTQ) with the W/A TPC and 8-bit first/last layers
    with phases("quantization"):
        common.seed_everything(args.seed)
        tpc = build_tpc(args.w, args.a, args.act_method, mp_bits if args.mixed else None)
        special = special_nodes(model)
        bwc = BitWidthConfig()
        if args.w != 8:
            bwc.set_manual_weights_bit_width([NodeNameFilter(n) for n in special["w8"]], 8, "weight")
        if args.a != 8:
            bwc.set_manual_activation_bit_width([NodeNameFilter(n) for n in special["a8"]], 8)
        ru = None
        if args.mixed:
            ru = mct.core.ResourceUtilization(weights_memory=mp_target["mct_weights_memory"])
            mp_cfg = (mct.core.MixedPrecisionQuantizationConfig(num_of_images=args.mp_images) if args.mp_images
                      else mct.core.MixedPrecisionQuantizationConfig())
            core_cfg = CoreConfig(mixed_precision_config=mp_cfg, bit_width_config=bwc)
        else:
            core_cfg = CoreConfig(bit_width_config=bwc)
        if args.gptq:
            gptq_cfg = mct.gptq.get_pytorch_gptq_config(n_epochs=args.gptq_epochs)
            qmodel, _ = mct.gptq.pytorch_gradient_post_training_quantization(
                model, repr_data, target_resource_utilization=ru, core_config=core_cfg, gptq_config=gptq_cfg,
                target_platform_capabilities=tpc)
        else:
            qmodel, _ = mct.ptq.pytorch_post_training_quantization(
                model, repr_data, target_resource_utilization=ru, core_config=core_cfg, target_platform_capabilities=tpc)
        qmodel = qmodel.cpu().eval()

    layout = describe(qmodel)
    wb = layout["weight_bits"]
    bits = {}
    for L in layers:  # MCT names a conv whose BN it folded "<conv>_bn"
        b = wb.get(f"{L['fx']}_bn.weight", wb.get(f"{L['fx']}.weight"))
        if b is None:
            sys.exit(f"mct_peer: no weight quantizer found for layer {L['fx']} in MCT's model ({sorted(wb)})")
        bits[L["fx"]] = b
    got = weight_memory(layers, bits)
    mixed = None
    if args.mixed:
        searched = [L for L in layers if L["fx"] not in pinned]
        mixed = {
            "matched_uniform_w": args.w,
            "candidates": mp_bits,
            "target": mp_target,
            "achieved": got,
            "within_target": got["mct_weights_memory"] <= mp_target["mct_weights_memory"],
            "bits": {L["module"]: bits[L["fx"]] for L in layers},
            "pinned": sorted(L["module"] for L in layers if L["fx"] in pinned),
            "searched_mean_w": round(sum(L["numel"] * bits[L["fx"]] for L in searched)
                                     / sum(L["numel"] for L in searched), 4),
            "mp_config": {"num_of_images": args.mp_images or "MCT default (32)",
                          "other": "MCT defaults: MixedPrecisionQuantizationConfig() (distance weighting AVG over "
                                   "interest points, no Hessian scores, ILP search, refine_mp_solution=True)"},
        }
    with phases("eval"):
        metrics = common.evaluate(qmodel, pre, eval_path, args.eval_limit)

    peer = ("mct-gptq" if args.gptq else "mct") + ("-mp" if args.mixed else "")
    extra = {"weight_memory": got}
    if mixed is not None:
        extra["mixed"] = mixed
    if gen_cached is not None:
        extra["data_generation_cached"] = gen_cached
    mp_note = ""
    if args.mixed:
        a_cands = f"A{args.a}" + ("/A8" if args.a != 8 else "")
        mp_note = (f", weight candidates {','.join(map(str, sorted(set(mp_bits) | {8})))} x {a_cands} "
                   "(mixed precision, weights_memory target)")
    rec = common.base_record(
        peer, args, phases, metrics,
        peer_package=PEER_DIST,
        peer_version=common.versions(PEER_DIST)[PEER_DIST],
        versions=common.versions(PEER_DIST),
        method=("MCT GPTQ" if args.gptq else "MCT PTQ") + (" + MCT mixed precision" if args.mixed else "")
        + " + MCT data generation",
        settings={
            "data_generation": {"n_images": args.gen_images, "n_iter": args.gen_iters,
                                "batch_size": args.gen_batch, "output_image_size": size,
                                "other": "MCT defaults (RAdam lr 16, reduce-on-plateau-with-reset, L2^2 BN alignment, "
                                         "negative min-max output loss, smoothing+augmentation pipeline, 32 extra "
                                         "pixels, torchvision normalization)"},
            "calibration_batch": args.calib_batch,
            "tpc": f"imx500 v1.0 operator sets/fusing, base W{args.w}A{args.a}, "
                   f"weights symmetric per-channel, activations {args.act_method}" + mp_note,
            "core_config": "MCT defaults (QuantizationConfig(): MSE threshold search, shift-negative correction, "
                           "weights bias correction ...)",
            "manual_8bit": special,
            "gptq_epochs": args.gptq_epochs if args.gptq else None,
        },
        layout=layout,
        **extra,
        protocol_note=PROTOCOL_NOTE + (f"; GPTQ {args.gptq_epochs} epochs on the generated images"
                                       if args.gptq else ""),
    )
    common.write_result(args.out, rec)
    print(f"{peer} W{args.w}A{args.a} s{args.seed}: top1 {metrics['top1']} (n={metrics['n']}), "
          f"wall {rec['wall_s']} s -> {args.out}")
    if mixed is not None:
        print(f"  weight memory: MCT {mixed['achieved']['mct_weights_memory']:g} / target "
              f"{mixed['target']['mct_weights_memory']:g} bytes, zsq count {mixed['achieved']['zsq_q_bytes']} / "
              f"{mixed['target']['zsq_q_bytes']}; bits {' '.join(map(str, mixed['bits'].values()))}")


def describe(qmodel) -> dict:
    """Bit widths MCT actually applied: weights per layer and activation quantizers, as MCT reports them."""
    w_bits, a_bits = {}, {}
    for name, m in qmodel.named_modules():
        wq = getattr(m, "weights_quantizers", None)
        if isinstance(wq, dict):
            for attr_name, q in wq.items():
                nb = getattr(q, "num_bits", None)
                if nb is not None:
                    w_bits[f"{name}.{attr_name}"] = int(nb)
        aq = getattr(m, "activation_holder_quantizer", None)
        if aq is not None and getattr(aq, "num_bits", None) is not None:
            a_bits[name] = int(aq.num_bits)
    return {"weight_bits": w_bits, "activation_bits": a_bits}


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
