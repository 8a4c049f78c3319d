"""Contextualization through MiniLM's layers (Kobayashi et al. 2021, 2024) on bundled Wikipedia summaries.

Per layer, the mean over the texts of the mixing ratio after attention + residual + norm (the 2021 paper: 18.8% for
BERT-base, fewer-layer models mixing more), and the contextualization change of the feed-forward layer alone against
that of the whole feed-forward block (the 2024 paper's cancellation: the residual and norm after the feed-forward
layer undo most of its change); seconds per text.

    python benchmarks/contextualization.py                       # 200 summaries through MiniLM, ~3 minutes
    python benchmarks/contextualization.py --texts 20 --model runs/mlm-bert   # any model maskkit analyze reads
"""

import argparse
import tempfile

from maskkit.analyze import analyze
from maskkit.data.text import read_wiki


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--texts", type=int, default=200)
    parser.add_argument("--max-words", type=int, default=60, help="each summary cut to its first words")
    args = parser.parse_args()
    texts = [" ".join(d.text.split()[: args.max_words]) for d in read_wiki().documents[: args.texts]]
    with tempfile.TemporaryDirectory() as tmp:
        summary = analyze(args.model, texts, f"{tmp}/out", progress=True, heatmaps=0)
    stage = "norm" if summary["post_norm"] else "residual"
    block = "feed-forward block"
    print(f"{summary['model']}: {len(texts)} texts of at most {args.max_words} words, "
          f"{summary['seconds_per_text']:.2f} s per text")
    print(f"{'layer':>5} {'mixing ratio':>12} {'FF change':>10} {'FF block change':>16}")
    for index, (mixing, change) in enumerate(zip(summary["mixing_ratio"], summary["contextualization_change"],
                                                 strict=True)):
        print(f"{index + 1:>5} {mixing[stage]:12.3f} {change['ffn']:10.3f} {change[block]:16.3f}")
    mean = sum(row[stage] for row in summary["mixing_ratio"]) / len(summary["mixing_ratio"])
    print(f"mean mixing ratio {mean:.3f}; top amplified pairs:",
          ", ".join(f"{p['target_token']}<-{p['source_token']} x{p['factor']:.1f}" for p in summary["ffn_amplified_pairs"][:8]))


if __name__ == "__main__":
    main()
