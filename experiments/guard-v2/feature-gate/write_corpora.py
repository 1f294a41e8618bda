"""Write `dsg demo`'s corpora as two .jsonl files, so that `dsg build` with no flags can be run on them.

The forget file holds the WMDP-bio and MMLU-biology build questions and the retain file the non-biology MMLU build
questions and the WikiText build paragraphs, each in the formats `dsg demo` builds from
(`embedded.forget_texts("build", tokenizer)`, `retain_texts`): one `{"text": ...}` object per line.

    python experiments/guard-v2/feature-gate/write_corpora.py --out /tmp/corpora
    dsg build --base "$DSG_SHARED_DIR/models/SmolLM2-135M-Instruct.Q4_1.gguf" \
        --sae modeling_dsg/embedded/sae/smollm2-135m-layer6 --name biology \
        --forget /tmp/corpora/forget.jsonl --retain /tmp/corpora/retain.jsonl --out /tmp/no-flags
    python experiments/guard-v2/feature-gate/folder_rates.py --model /tmp/no-flags --name dsg-build-no-flags \
        --out experiments/guard-v2/feature-gate
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None):
    from modeling_dsg.data.sources import load_base_model
    from modeling_dsg.embedded import data as embedded

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="a new folder")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    _, tokenizer = load_base_model(str(embedded.gguf_path()))  # the tokenizer's chat template
    for name, texts in (
        ("forget", embedded.forget_texts("build", tokenizer)),
        ("retain", embedded.retain_texts("build", tokenizer)),
    ):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
        print(f"{out / name}.jsonl: {len(texts)} texts")


if __name__ == "__main__":
    main()
