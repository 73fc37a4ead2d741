"""Qualcomm AIMET (aimet-torch 2.30.0) on a zsq model: the data-free path of AIMET's post-training
tools -- cross-layer equalization (BN folding, cross-layer scaling, high-bias folding), analytical
bias correction (from BN statistics, no data), then QuantSim with ranges from Gaussian noise --
evaluated with zsq's loaders and top-1 code.

Run with the AIMET venv (``bash bench/peers/setup.sh aimet`` makes it)::

    OMP_NUM_THREADS=1 bench/peers/.venv-aimet/bin/python bench/peers/aimet_peer.py --w 4 --a 8 --seed 0 \
        --out /tmp/aimet.json [--eval-limit 500]

Bit widths: QuantSim's ``default_param_bw=W`` / ``default_output_bw=A``, then the first conv's and
the last FC's weight quantizers, the network-input quantizer, the stem output, the classifier input
and the logits are set to 8 bits (``quantizer.bitwidth = 8``) before ``compute_encodings``.
Everything else is AIMET's default ``QuantizationSimModel`` configuration (``default`` config file:
symmetric per-tensor weights, asymmetric activations at every op output, supergroups Conv+ReLU and
Add+ReLU, the network input quantized).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PEER_DIST = "aimet-torch"

PROTOCOL_NOTE = (
    "AIMET's own QuantSim: BN folded (with CLE's scaling and high-bias folding), weights symmetric "
    "per tensor (zsq `fixed`: asymmetric per channel), activations asymmetric at every op output incl. "
    "each block's second conv output before the residual add, the network input and the logits (both "
    "8 bits here); stem output, classifier input, first conv and last FC at 8 bits as in `fixed`; "
    "{cle}{bc}; activation ranges from {n} "
    "Gaussian-noise images ({scheme})"
)


def _snapshot_bn_producers(model, dummy) -> dict:
    """Before CLE: for every BN that AIMET folds into a preceding conv, that conv's name, its folded
    weight and bias, and the BN's (gamma, beta), keyed by the BN's module name."""
    import copy

    import torch
    from aimet_torch.batch_norm_fold import fold_all_batch_norms

    gb = {n: (m.weight.detach().clone(), m.bias.detach().clone())
          for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    ref = copy.deepcopy(model)
    ref_names = {id(m): n for n, m in ref.named_modules()}
    out = {}
    for conv, bn in fold_all_batch_norms(ref, None, dummy_input=dummy):
        bn = bn.get_module() if hasattr(bn, "get_module") else bn
        bn_name, conv_name = ref_names.get(id(bn)), ref_names.get(id(conv))
        if bn_name in gb and conv_name is not None and conv.bias is not None:
            out[bn_name] = (conv_name, conv.weight.detach().clone(), conv.bias.detach().clone(), *gb[bn_name])
    return out


def _bc_standins(conv_bn: dict, producers: dict, model, bn_names: dict) -> int:
    """Point AIMET's analytical bias correction at the BN statistics of the *equalized* network.

    ``find_all_conv_bn_with_activation`` must run before CLE (CLE folds the BNs away), but CLE
    then divides every output channel c of a folded conv by s_c (cross-layer scaling) and
    high-bias folding moves part of its bias downstream, so the recorded BN (gamma, beta) no longer
    describe that conv's output (AIMET's own high-bias fold divides them by s on the fly for the
    same reason). For each recorded input BN: 1/s_c is read off the conv's weights (after / before
    CLE, per output channel), gamma' = gamma / s_c and beta' = (beta - b_folded) / s_c + b_now,
    i.e. the mean and std of the equalized conv's output under the BN-statistics assumption.
    Returns how many BNs were updated.
    """
    import torch

    live = dict(model.named_modules())
    n = 0
    for _layer, info in conv_bn.items():
        op = getattr(info, "input_bn", None)
        if op is None:
            continue
        bn = op.get_module() if hasattr(op, "get_module") else op
        prod = producers.get(bn_names.get(id(bn)))
        if prod is None:
            continue
        conv_name, w0, b0, gamma, beta = prod
        conv = live[conv_name]
        dims = tuple(range(1, w0.dim()))
        inv_s = conv.weight.detach().abs().amax(dim=dims) / w0.abs().amax(dim=dims).clamp_min(1e-12)
        with torch.no_grad():
            bn.weight.copy_(gamma * inv_s)
            bn.bias.copy_((beta - b0) * inv_s + conv.bias.detach())
        n += 1
    return n


def main() -> None:
    p = common.base_parser(__doc__.split("\n")[0])
    p.add_argument("--noise-images", type=int, default=256, help="Gaussian-noise images for the ranges (default %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="noise batch size (default %(default)s)")
    p.add_argument("--quant-scheme", choices=("tf_enhanced", "min_max"), default="tf_enhanced",
                   help="range scheme of QuantSim and of the bias-correction sim (default %(default)s: QuantParams' "
                        "default and AIMET's CLE/BC examples; QuantizationSimModel's own default is min_max since 2.0)")
    p.add_argument("--bc", choices=("analytical", "analytical-rescaled", "analytical+empirical", "none"),
                   default="analytical",
                   help="bias correction. analytical (default): AIMET's documented CLE+BC flow, BN statistics recorded "
                        "before CLE, layers without an input BN left uncorrected (no data used); analytical-rescaled: "
                        "the same with the BN statistics carried through CLE's scaling and high-bias fold; "
                        "analytical+empirical: AIMET's mix, layers without an input BN corrected empirically on the "
                        "noise; none")
    p.add_argument("--no-cle", action="store_true", help="skip cross-layer equalization (BN folding only)")
    args = p.parse_args()
    common.setup_threads(args.threads)
    phases = common.Phases()

    with phases("load"):
        import copy

        import torch
        from aimet_torch.batch_norm_fold import fold_all_batch_norms
        from aimet_torch.bias_correction import correct_bias, find_all_conv_bn_with_activation
        from aimet_torch.common.defs import QuantScheme
        from aimet_torch.cross_layer_equalization import equalize_model
        from aimet_torch.model_preparer import prepare_model
        from aimet_torch.quantsim import QuantizationSimModel, QuantParams
        from zsq.record import model_info

        common.seed_everything(args.seed)
        fp = common.load_fp_model(args.model)
        pre = model_info(fp).preprocess
        size = pre.input_size
        eval_path = common.asset(args.eval)
        scheme = {"min_max": QuantScheme.min_max, "tf_enhanced": QuantScheme.post_training_tf_enhanced}[args.quant_scheme]

    # 1. "data": Gaussian noise in the network's input space (normalized images), as zsq's minmax-noise
    with phases("data_generation"):
        g = torch.Generator().manual_seed(args.seed)
        noise = torch.randn(args.noise_images, 3, size, size, generator=g)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(noise, torch.zeros(len(noise), dtype=torch.long)),
            batch_size=args.batch, shuffle=False)
        dummy = noise[:1].clone()

    with phases("quantization"):
        common.seed_everything(args.seed)
        model = prepare_model(copy.deepcopy(fp).eval())  # AIMET's fx preparation (functional add -> module)
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        first_name, last_name = convs[0][0], linears[-1][0]

        conv_bn = find_all_conv_bn_with_activation(model, dummy) if args.bc != "none" else {}
        bn_names = {id(m): n for n, m in model.named_modules()}
        producers = _snapshot_bn_producers(model, dummy) if args.bc == "analytical-rescaled" else {}

        if not args.no_cle:
            equalize_model(model, dummy_input=dummy)
        else:
            fold_all_batch_norms(model, None, dummy_input=dummy)

        n_standins = _bc_standins(conv_bn, producers, model, bn_names) if producers else 0
        if args.bc != "none":
            # first conv and last FC are kept at 8 bits: not corrected for a W-bit error they won't have
            ignore = [convs[0][1], linears[-1][1]]
            if args.bc != "analytical+empirical":
                # analytical only: AIMET would correct layers without an input BN empirically (on the noise)
                ignore += [m for _, m in convs + linears
                           if m not in conv_bn or conv_bn[m] is None or conv_bn[m].input_bn is None]
            # AIMET's QuantSim constructor accepts 4..32 bits: below 4, the correction is computed for 4-bit weights
            params = QuantParams(weight_bw=max(args.w, 4), act_bw=max(args.a, 4), round_mode="nearest",
                                 quant_scheme=scheme)
            correct_bias(model, params, num_quant_samples=args.noise_images, data_loader=loader,
                         num_bias_correct_samples=args.noise_images, conv_bn_dict=conv_bn,
                         perform_only_empirical_bias_corr=False, layers_to_ignore=ignore)

        order = call_order(model, dummy)
        # the constructor accepts 4..32 bits; lower widths are set on the quantizers (their public
        # ``bitwidth`` setter) before the 8-bit overrides and compute_encodings
        sim = QuantizationSimModel(model, dummy_input=dummy, quant_scheme=scheme,
                                   default_output_bw=max(args.a, 4), default_param_bw=max(args.w, 4))
        if args.w < 4 or args.a < 4:
            set_bits(sim.model, args.w, args.a)
        eight = set_8bit(sim.model, order, first_name, last_name)

        def calib(m):
            with torch.no_grad():
                for x, _ in loader:
                    m(x)

        sim.compute_encodings(calib)
        qmodel = sim.model.eval()

    layout = describe(qmodel)
    with phases("eval"):
        metrics = common.evaluate(qmodel, pre, eval_path, args.eval_limit)

    rec = common.base_record(
        "aimet", args, phases, metrics,
        peer_package=PEER_DIST,
        peer_version=common.versions(PEER_DIST)[PEER_DIST],
        versions=common.versions(PEER_DIST),
        method="AIMET QuantSim" + ("" if args.no_cle else " + CLE") +
               ("" if args.bc == "none" else f" + bias correction ({args.bc})"),
        settings={
            "noise_images": args.noise_images, "batch": args.batch, "quant_scheme": args.quant_scheme,
            "quantsim_config": "default", "cle": not args.no_cle, "bias_correction": args.bc,
            "bc_bn_standins": n_standins, "bc_weight_bw": max(args.w, 4) if args.bc != "none" else None,
            "eight_bit": eight,
        },
        layout=layout,
        protocol_note=PROTOCOL_NOTE.format(
            n=args.noise_images, scheme=args.quant_scheme, cle="" if args.no_cle else "CLE + ",
            bc="no bias correction" if args.bc == "none" else
            f"bias correction '{args.bc}' of the convs fed by a BN+ReLU"
            + (" (computed for 4-bit weights: AIMET's QuantSim accepts 4..32 bits)" if args.w < 4 else "")),
    )
    common.write_result(args.out, rec)
    print(f"aimet W{args.w}A{args.a} s{args.seed}: top1 {metrics['top1']} (n={metrics['n']}), "
          f"wall {rec['wall_s']} s -> {args.out}")


def call_order(model, dummy) -> list[str]:
    """Names of the leaf modules in the order a forward pass calls them."""
    import torch

    names, hooks = [], []
    for n, m in model.named_modules():
        if n and not list(m.children()):
            hooks.append(m.register_forward_hook(lambda mod, i, o, n=n: names.append(n)))
    try:
        with torch.no_grad():
            model(dummy)
    finally:
        for h in hooks:
            h.remove()
    return names


def _quantizers(mod, kind: str) -> list:
    qs = getattr(mod, kind, None)
    if qs is None:
        return []
    return [q for q in (qs.values() if hasattr(qs, "values") else qs) if q is not None]


def set_bits(qmodel, w: int, a: int) -> None:
    """Every weight quantizer to ``w`` bits, every input/output quantizer to ``a`` bits."""
    for m in qmodel.modules():
        pq = getattr(m, "param_quantizers", None)
        if pq is not None and hasattr(pq, "items"):
            for k, q in pq.items():
                if q is not None and k == "weight":
                    q.bitwidth = w
        for kind in ("input_quantizers", "output_quantizers"):
            for q in _quantizers(m, kind):
                q.bitwidth = a


def set_8bit(qmodel, order: list[str], first: str, last: str) -> dict:
    """First conv's weights and input (the network input), the stem output, the classifier input
    (the last block output and what lies between it and the FC) and the FC's weights and output at 8
    bits. Returns what was set, by module name."""
    import torch

    done = {}

    def eight(name, kind, key=None):
        mod = qmodel.get_submodule(name)
        if kind == "param_quantizers":
            q = mod.param_quantizers[key] if key in mod.param_quantizers else None
            qs = [q] if q is not None else []
        else:
            qs = _quantizers(mod, kind)
        for q in qs:
            q.bitwidth = 8
        if qs:
            done.setdefault(name, []).append(kind.replace("_quantizers", "") + (f".{key}" if key else ""))

    eight(first, "param_quantizers", "weight")
    eight(first, "input_quantizers")
    eight(last, "param_quantizers", "weight")
    eight(last, "input_quantizers")
    eight(last, "output_quantizers")
    with_out = [n for n in order if _quantizers(qmodel.get_submodule(n), "output_quantizers")]
    i_first, i_last = order.index(first), order.index(last)
    stem = next((n for n in with_out if order.index(n) >= i_first), None)
    if stem is not None:
        eight(stem, "output_quantizers")
    acts = (torch.nn.ReLU, torch.nn.ReLU6)
    for n in reversed([n for n in with_out if order.index(n) < i_last]):
        eight(n, "output_quantizers")
        if isinstance(qmodel.get_submodule(n), acts):
            break
    return done


def describe(qmodel) -> dict:
    """Bit widths of every weight and activation quantizer QuantSim placed, by module name."""
    w_bits, a_bits = {}, {}
    for name, m in qmodel.named_modules():
        pq = getattr(m, "param_quantizers", None)
        if pq is not None and hasattr(pq, "items"):
            for k, q in pq.items():
                if q is not None and hasattr(q, "bitwidth"):
                    w_bits[f"{name}.{k}"] = int(q.bitwidth)
        for kind in ("input_quantizers", "output_quantizers"):
            for j, q in enumerate(_quantizers(m, kind)):
                if hasattr(q, "bitwidth"):
                    a_bits[f"{name}.{kind.split('_')[0]}{j}"] = int(q.bitwidth)
    return {"weight_bits": w_bits, "activation_bits": a_bits}


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
