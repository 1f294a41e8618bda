"""Why did each guardrail fire (or not) on a text? The Python API behind `dsg explain`.

For every guardrail: rho against tau, the decision, each token on which a selected feature was active
(with the activations) and, from the folder's features.json, those features' top-activating tokens.
Run after `dsg demo`:

    python examples/explain_text.py --model dsg-demo "Which protein lets the virus bind to the host cell?"
"""

import argparse
import json
import sys
from collections import Counter

from modeling_dsg.analysis.explain import explain, format_report, load_for_explain
from modeling_dsg.errors import DSGError

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("text", nargs="?", default="Which protein lets the virus bind to the host cell?")
parser.add_argument("--model", default="dsg-demo", help="a DSG model folder (default: ./dsg-demo)")
parser.add_argument("--chat", action="store_true", help="wrap the text in the chat template as a user turn")
parser.add_argument("--json", action="store_true", help="print the structured result instead of the table")
args = parser.parse_args()

try:
    model, tokenizer, features_info = load_for_explain(args.model)  # features_info: features.json, or None
    results = explain(model, tokenizer, args.text, chat=args.chat, features_info=features_info)
except DSGError as err:
    sys.exit(f"error: {err}")

if args.json:
    print(json.dumps(results, indent=2))
else:
    print(format_report(results))
    for r in results:  # the structured result (one dict per guardrail) is there to use directly
        counts = Counter(f["index"] for row in r["tokens"] for f in row["features"])
        print(
            f"guardrail {r['guardrail']!r}: features active on the most tokens (feature, tokens): "
            f"{counts.most_common(5)}"
        )
