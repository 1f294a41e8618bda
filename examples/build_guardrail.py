"""Build an unlearned DSG model from Python:
`modeling_dsg.pipelines.build.build(base, sae, forget, retain, out, options=...)`.

The same path as `dsg build` (the options mirror its flags): the SAE's activations on the forget and
retain corpora select the features, the retain rows calibrate tau, and the model folder is written
atomically. The defaults are the embedded ones (SmolLM2-135M-Instruct from ../shared, the shipped SAE,
WMDP-bio questions as forget and WikiText as retain), so it runs without arguments; a quicker build:

    python examples/build_guardrail.py --out dsg-bio --max-docs 256
"""

import argparse
import sys

from modeling_dsg.embedded.demo import default_sae
from modeling_dsg.errors import DSGError
from modeling_dsg.paths import shared_dir
from modeling_dsg.pipelines.build import DEFAULT_TARGET_FPR, BuildOptions, build, fallback_notes
from modeling_dsg.runtime.configuration_dsg import ACTIONS, SCORES

shared = shared_dir(required=False) or "../shared"
d = BuildOptions()
parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].splitlines()))
parser.add_argument("--base", default=f"{shared}/models/SmolLM2-135M-Instruct.Q4_1.gguf", help="folder, .gguf, Hub id")
parser.add_argument(
    "--sae", help="sae-lens folder or RELEASE:SAE_ID (default: the SAE shipped in modeling_dsg/embedded/sae/)"
)
parser.add_argument("--forget", nargs="+", default=[f"{shared}/data/wmdp/bio.jsonl"], help=".txt/.jsonl/.parquet/Hub")
parser.add_argument("--retain", nargs="+", default=[f"{shared}/data/wikitext-2-raw/wiki.test.raw"])
parser.add_argument("--out", default="dsg-built", help="the model folder to write")
parser.add_argument("--overwrite", action="store_true")
parser.add_argument("--name", default=d.name, help="the topic (guardrail name)")
parser.add_argument("--mode", choices=["dynamic", "static"], default=d.mode)
parser.add_argument("--layer", type=int, help="default: the layer in the SAE's hook name")
parser.add_argument("--n-features", type=int, default=d.n_features)
parser.add_argument("--clamp", type=float, default=d.clamp)
parser.add_argument("--action", choices=ACTIONS, default=d.action, help="what the guardrail does when it fires")
parser.add_argument("--refusal", help="with --action refuse: the refusal text (default: the package's)")
parser.add_argument("--ratio-percentile", type=float, default=d.ratio_percentile)
parser.add_argument("--score", choices=SCORES, help="rho (default: features in dynamic mode, window in static mode)")
parser.add_argument("--threshold-percentile", type=float, help="tau by the paper's rule (default: an FPR bound)")
parser.add_argument(
    "--target-fpr", type=float, help=f"tau from a 95%% bound on the retain firing rate (default {DEFAULT_TARGET_FPR})"
)
parser.add_argument("--seq-len", type=int, default=d.seq_len)
parser.add_argument("--max-docs", type=int, default=d.max_docs)
parser.add_argument(
    "--packing", action=argparse.BooleanOptionalAction, default=d.packing, help="EOS-joined rows (the paper's)"
)
parser.add_argument("--batch-size", type=int, default=d.batch_size)
parser.add_argument("--slim", action="store_true", help="store only the selected features' SAE slices")
parser.add_argument("--device", default=d.device)
args = parser.parse_args()

options = BuildOptions(
    name=args.name,
    mode=args.mode,
    layer=args.layer,
    n_features=args.n_features,
    clamp=args.clamp,
    action=args.action,
    refusal=args.refusal,
    ratio_percentile=args.ratio_percentile,
    score=args.score,
    threshold_percentile=args.threshold_percentile,
    target_fpr=args.target_fpr,
    seq_len=args.seq_len,
    max_docs=args.max_docs,
    packing=args.packing,
    batch_size=args.batch_size,
    slim=args.slim,
    device=args.device,
)
try:
    info = build(
        args.base,
        args.sae or str(default_sae()),
        args.forget,
        args.retain,
        args.out,
        options=options,
        overwrite=args.overwrite,
    )
except DSGError as err:  # bad input: one clear line, and no half-written folder
    sys.exit(f"error: {err}")

for note in fallback_notes(info):  # what a default could not do with these corpora
    print(f"warning: {note}", file=sys.stderr)
held = info["heldout"]
print(
    f"guardrail {info['name']!r}: layer {info['layer']}, {info['n_features']} features, tau = {info['tau']:.4f}, "
    f"action {info['action']}"
)
print(f"held-out trigger rate: forget {held['forget_trigger_rate']:.3f}, retain {held['retain_trigger_rate']:.3f}")
print(f"wrote {args.out}: load it with AutoModelForCausalLM.from_pretrained({args.out!r}, trust_remote_code=True)")
