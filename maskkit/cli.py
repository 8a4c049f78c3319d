"""The `maskkit` command: train, eval, demo, and recipe helpers (ls, cp, validate).

Errors a user can fix (MaskkitError) print as one line and exit with status 2; `--debug` shows the
traceback instead.
"""

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from maskkit import __version__
from maskkit.errors import MaskkitError


class _Parser(argparse.ArgumentParser):
    """Usage errors are MaskkitErrors too: one line, exit status 2."""

    def error(self, message: str):
        raise MaskkitError(f"{message} (see `{self.prog} --help`)")


def _measurement_arguments(parser) -> None:
    """How compress and pareto measure quality and footprint."""
    parser.add_argument("--test", help="a classifier's test documents (JSON lines of text, label; default "
                                       "RUN/../test.jsonl, which maskkit distill writes)")
    parser.add_argument("--batch", type=int, default=32, help="the throughput batch of the profiles (32)")
    parser.add_argument("--length", type=int, help="tokens per text in the profiles (default min(128, context))")
    parser.add_argument("--repeats", type=int, default=20, help="timed forwards at batch 1 (20)")
    parser.add_argument("--compile", action="store_true", help="profile torch.compile(model)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maskkit", description="Masked and self-supervised pretraining.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"maskkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a recipe: maskkit train CONFIG [key=value ...]")
    train.add_argument("config", help="a YAML file or a bundled recipe name (see `maskkit ls`)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=1e-3 train.steps=100")
    train.add_argument("--out", help="run directory (default runs/<name>)")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    train.add_argument("--allow-reshard", action="store_true",
                       help="with --resume: continue on another number of ranks than the checkpoint was written by")
    train.add_argument("--extend-steps", type=int, metavar="N",
                       help="with --resume: train N steps more than the run's train.steps (finished or not); the "
                            "schedules are recomputed for the new total")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = sub.add_parser("eval", help="evaluate a run or checkpoint: maskkit eval RUN --protocol knn")
    evaluate.add_argument("path", help="run directory, checkpoint directory or backbone.safetensors")
    evaluate.add_argument("--protocol", default=None,
                          choices=["linear", "knn", "finetune", "dense-probe", "zero-shot", "retrieval", "text-classify",
                                   "text-probe", "seq2seq", "tokens", "lm-features", "classify"],
                          help="what to measure, on the run and on a random init of the same model (default: knn for an "
                               "image backbone, text-probe for a text model, classify for a tinybert stage). "
                               "An image backbone (mae, energy, moco, densecl, flip): knn, linear, finetune, "
                               "dense-probe; both towers of flip: zero-shot, retrieval; a text model (mlm, xlnet, "
                               "pmlm): text-classify, text-probe (a linear probe on frozen features), seq2seq; lqae: "
                               "tokens (reconstructions and their words), lm-features (the frozen LM's features: "
                               "linear, kNN, 5-way few-shot) besides knn and linear on its encoder; a classifier "
                               "(tinybert stages, compressed or not): classify (test accuracy on the test.jsonl "
                               "maskkit distill writes, or eval.test_documents=FILE)")
    evaluate.add_argument("overrides", nargs="*", help="dotted overrides of the data and eval keys the protocol reads, "
                                                       "e.g. eval.knn_k=10 data.name=folder data.path=DIR")
    evaluate.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")

    tokenizer = sub.add_parser("tokenizer", help="maskkit tokenizer train: learn a WordPiece vocabulary on a corpus")
    tokenizer_sub = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    learn = tokenizer_sub.add_parser("train", help="maskkit tokenizer train --vocab-size 4096 --out tok.json "
                                                   "[data.name=txt data.path=corpus.txt ...]")
    learn.add_argument("--vocab-size", type=int, default=4096)
    learn.add_argument("--out", required=True, help="the tokenizer.json to write (use it as data.tokenizer=PATH)")
    learn.add_argument("overrides", nargs="*", help="text data keys: data.name=wiki|txt|jsonl|hf data.path=... "
                                                    "data.text_field=...")

    distill = sub.add_parser("distill", help="TinyBERT: maskkit distill tinybert/tiny [key=value ...] (every stage, "
                                             "the teacher's fine-tuning first)")
    distill.add_argument("config", help="a tinybert recipe (see `maskkit ls`) or YAML file")
    distill.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.general_steps=100")
    distill.add_argument("--out", help="run directory (default runs/<name>)")
    distill.add_argument("--resume", action="store_true", help="continue the first unfinished stage")
    distill.add_argument("--no-progress", action="store_true", help="no progress bars")

    export = sub.add_parser("export", help="write a run's model for another library: maskkit export RUN --to hf DIR")
    export.add_argument("path", help="run directory or checkpoint directory")
    export.add_argument("--to", nargs=2, metavar=("FORMAT", "DIR"), required=True,
                        help="hf DIR: a Hugging Face save_pretrained folder (mae -> ViTMAEForPreTraining, flip -> "
                             "CLIPModel, mlm and pmlm with BERT's architecture -> BertForMaskedLM with the tokenizer, "
                             "tinybert stages -> BertForSequenceClassification with the tokenizer and class names); "
                             "safetensors DIR: the weights as a checkpoint of whole tensors (model.safetensors + "
                             "state.json, e.g. of a sharded fsdp2 run), for maskkit eval / export / train.init_from")

    analyze = sub.add_parser("analyze", help="contextualization analysis of a Transformer's layers: maskkit analyze "
                                             "minilm --text \"...\" --out DIR (or a ViT with --image)")
    analyze.add_argument("model", help="minilm (the bundled all-MiniLM-L6-v2), a Hugging Face BERT, CLIP or ViT-MAE "
                                       "directory, or a maskkit run")
    analyze.add_argument("--text", action="append", help="a text to analyze (repeat for more)")
    analyze.add_argument("--text-file", help="a UTF-8 file of texts, one per line")
    analyze.add_argument("--image", action="append",
                         help="an image file or a folder of images, for an image model (repeat for more)")
    analyze.add_argument("--out", required=True, help="the folder to write (new or empty)")
    analyze.add_argument("--save-vectors", action="store_true",
                         help="also write every contribution vector (contributions.safetensors, tokens.json)")
    analyze.add_argument("--float64", action="store_true", help="compute in float64 (exact sums; slower)")
    analyze.add_argument("--chunk", type=int, default=16,
                         help="target tokens at a time in the feed-forward stage (memory ~ chunk x tokens x d_ff)")
    analyze.add_argument("--no-progress", action="store_true", help="no progress bar")

    debias = sub.add_parser("debias", help="project biased prompt directions out of a two-tower model's zero-shot "
                                           "classifier: maskkit debias RUN --out DIR")
    debias.add_argument("model", help="a maskkit flip run or a Hugging Face CLIP directory")
    debias.add_argument("--classes", nargs="+", help="the class names (default on --eval biased-shapes: circle cross)")
    debias.add_argument("--template", action="append",
                        help="a class prompt with {} for the name (repeat for an ensemble; default \"a photo of a {}.\")")
    debias.add_argument("--spurious", nargs="+", help="prompts that describe only the spurious attribute")
    debias.add_argument("--attributes", nargs="+",
                        help="the spurious attribute's values as phrases (\"on water\"): the calibration pairs each "
                             "class's prompt across them")
    debias.add_argument("--pairs", help="a JSON file {\"prompts\": [...], \"pairs\": [[i, j], ...]} of positive pairs")
    debias.add_argument("--eval", help="a folder with metadata.csv (filepath, class, group), or biased-shapes "
                                       "(the default for a run trained on it)")
    debias.add_argument("--mode", default="calibrated", help="projection | calibrated (default) | calibration: the "
                                                             "P written to projection.safetensors")
    debias.add_argument("--lam", type=float, default=1000.0, help="the calibration weight lambda (default 1000)")
    debias.add_argument("--seed", type=int, default=0, help="the random control's subspace")
    debias.add_argument("--out", required=True, help="the folder to write (new or empty)")

    profile = sub.add_parser("profile", help="a model's footprint: parameters, size, FLOPs, latency, throughput, "
                                             "peak memory: maskkit profile MODEL")
    profile.add_argument("model", help="minilm, a Hugging Face BERT, CLIP or ViT-MAE directory, or a maskkit run")
    profile.add_argument("--batch", type=int, default=32, help="the throughput and memory batch (default 32)")
    profile.add_argument("--length", type=int, help="tokens per text (text models; default min(128, context))")
    profile.add_argument("--image-size", type=int, help="image side (image models; default and only: the model's)")
    profile.add_argument("--tower", default="", help="image (default) or text, for CLIP and FLIP")
    profile.add_argument("--repeats", type=int, default=20, help="timed forwards at batch 1 (default 20)")
    profile.add_argument("--json", help="also write the numbers to this JSON file")
    profile.add_argument("--compile", action="store_true", help="time torch.compile(model) (int8 models need it to be "
                                                                  "fast on a CPU)")
    compress = sub.add_parser("compress", help="quantize or prune a run's model, re-evaluated and re-profiled: "
                                               "maskkit compress RUN --quantize int8 --out DIR")
    compress.add_argument("run", help="a maskkit run or checkpoint")
    how = compress.add_mutually_exclusive_group(required=True)
    how.add_argument("--quantize", help="int8: int8 weights and activations in the blocks' Linear layers")
    how.add_argument("--prune-heads", type=int, help="remove K attention heads in all (least important first)")
    how.add_argument("--prune-ffn", type=float, help="remove this fraction of each layer's feed-forward neurons")
    how.add_argument("--prune-unstructured", type=float, help="zero this fraction of the blocks' Linear weights")
    compress.add_argument("--out", required=True, help="the compressed run (a new folder)")
    compress.add_argument("--batches", type=int, default=8, help="training batches the importance scores read (8)")
    _measurement_arguments(compress)
    pareto = sub.add_parser("pareto", help="quality against latency and size for runs and their compressed "
                                           "variants: maskkit pareto RUN... --out DIR")
    pareto.add_argument("runs", nargs="+", help="maskkit runs (compressed runs bring their compress.json numbers)")
    pareto.add_argument("--out", required=True, help="the folder for pareto.png and pareto.json")
    pareto.add_argument("--names", nargs="+", help="a label per run for the plot and table, in order (default: "
                                                   "the run folder's name)")
    _measurement_arguments(pareto)

    sub.add_parser("ls", help="list bundled recipes")
    copy = sub.add_parser("cp", help="copy a bundled recipe to edit it: maskkit cp mae/tiny my.yaml")
    copy.add_argument("recipe")
    copy.add_argument("path")
    validate = sub.add_parser("validate", help="check a config without training")
    validate.add_argument("config")
    validate.add_argument("overrides", nargs="*")

    demo = sub.add_parser("demo", help="maskkit demo [mae|flip|text]: pretrain on bundled data, evaluate against random init")
    demo.add_argument("--out", help="run directory (default runs/demo, runs/demo-flip, runs/demo-text)")
    demo.add_argument("overrides", nargs="*", help="mae (default), flip or text, then dotted overrides for its tiny recipe(s)")
    demo.add_argument("--no-progress", action="store_true")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like parse_args, but `key=value` overrides may also come after options (`--out runs/x train.steps=2`)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    stray = [arg for arg in extra if "=" not in arg or arg.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra and not hasattr(args, "overrides"):
        parser.error(f"{args.command} takes no key=value overrides: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = parse_args(argv)
        return run(args)
    except MaskkitError as error:
        if "--debug" in argv:
            raise
        print(f"maskkit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("maskkit: interrupted; checkpoints already written are intact (continue with --resume)", file=sys.stderr)
        return 130


def format_eval(result: dict) -> str:
    """A short table of one protocol's result (the full record is in eval.json)."""
    recorded = f"recorded in {result['eval_json']}" if result.get("eval_json") else "not recorded"
    overrides = f" with {' '.join(result['overrides'])}" if result.get("overrides") else ""
    footer = f"checkpoint {result['checkpoint']}{overrides}; {recorded}"
    if result["protocol"] == "classify":     # a trained classifier: no random init to compare
        documents = "document" if result["num_test"] == 1 else "documents"
        lines = [f"classify on {result['dataset']} ({result['num_test']} test {documents}) -- test accuracy",
                 f"  {'classifier':<16} {result['accuracy']:.3f}",
                 f"  {'majority class':<16} {result['majority']:.3f}"]
        if result.get("unknown_classes"):
            lines.append(f"  classes the classifier does not know (counted wrong): {', '.join(result['unknown_classes'])}")
        return "\n".join([*lines, footer])
    pretrained, random_init = result["pretrained"], result["random_init"]
    headline = {"zero-shot": "accuracy on held-out pairs" if result["dataset"] == "shapes" else "accuracy",
                "retrieval": "mean R@1 (image->text, text->image)",
                "dense-probe": "mIoU of a per-token linear probe",
                "seq2seq": f"ROUGE-L F1 of generated targets (beam {result.get('beam_size', 1)})",
                "text-classify": "test accuracy after fine-tuning",
                "text-probe": "test accuracy of a linear probe on frozen features",
                "tokens": "reconstruction PSNR (dB) from the words",
                "lm-features": "linear probe on the frozen LM's features of the words"}.get(result["protocol"], "accuracy")
    unit = "documents" if result["protocol"] in ("text-classify", "text-probe", "seq2seq") else "images"
    # zero-shot and retrieval train nothing, so they have no training set to count.
    train = f"{result['num_train']} train / " if "num_train" in result else ""
    lines = [
        f"{result['protocol']} on {result['dataset']} ({train}{result['num_test']} test {unit}) -- {headline}",
        f"  {'pretrained':<12} {pretrained:.3f}",
        f"  {'random init':<12} {random_init:.3f}",
        f"  {'gain':<12} {pretrained - random_init:+.3f}",
    ]
    if "pretrained_seen_pairs" in result:
        lines.append(f"  seen pairs: pretrained {result['pretrained_seen_pairs']:.3f}, random init "
                     f"{result['random_init_seen_pairs']:.3f} (chance {result['chance']:.3f})")
    if "pretrained_exact_match" in result:
        lines.append(f"  exact match: pretrained {result['pretrained_exact_match']:.3f}, random init "
                     f"{result['random_init_exact_match']:.3f}")
        for source, reference, prediction in result["pretrained_examples"][:3]:
            lines.append(f"  {str(source)[:60]!r}... -> {prediction!r} (reference {reference!r})")
    if "majority" in result:
        lines.append(f"  majority class: {result['majority']:.3f}")
    if "pretrained_knn" in result:          # lm-features
        for key in ("knn", "5way_1shot", "5way_5shot"):
            lines.append(f"  {key}: pretrained {result['pretrained_' + key]:.3f}, random init "
                         f"{result['random_init_' + key]:.3f}")
    for words in result.get("sequences", [])[:4]:   # tokens
        lines.append(f"  {words}")
    if "png" in result:
        lines.append(f"  images, reconstructions and words: {result['png']}")
    if "pretrained_recall" in result:
        lines.append("  " + ", ".join(f"{k} {v:.3f}" for k, v in result["pretrained_recall"].items()))
    lines.append(footer)
    return "\n".join(lines)


def check_resume_recipe(config: str, recipe, saved, out: Path) -> None:
    """--resume trains the run's saved config, not the recipe on the command line: a recipe of another method
    is refused (it was surely meant for another run), one of another name is said to be unused."""
    if recipe.method != saved.method:
        raise MaskkitError(f"--resume: {out} is a {saved.method} run ({saved.name}), but {config} trains "
                           f"{recipe.method} ({recipe.name}); resume it with {out / 'config.yaml'}, or train "
                           f"{config} into another --out")
    if recipe.name != saved.name:
        logging.getLogger("maskkit").info("--resume: %s continues with its saved config (%s); the values of %s (%s) "
                                          "are not used", out, saved.name, config, recipe.name)


def run(args) -> int:
    from maskkit import config as configs

    if args.command == "ls":
        for name in configs.list_recipes():
            print(name)
        return 0
    if args.command == "cp":
        source, target = configs.resolve_recipe(args.recipe), Path(args.path)
        if target.exists():
            raise MaskkitError(f"{target} already exists; choose another path")
        shutil.copyfile(source, target)
        print(f"copied {source.name} to {target}")
        return 0
    if args.command == "tokenizer":
        from maskkit.data.text import TextDataConfig, check_text_data, train_tokenizer

        values = configs.apply_overrides({}, args.overrides)
        unknown = [key for key in values if key != "data"]
        if unknown:
            raise MaskkitError(f"maskkit tokenizer train takes data.* keys only, got {unknown[0]}")
        data = configs.build_dataclass(TextDataConfig, {"kind": "text", **values.get("data", {})}, "command line",
                                       prefix="data.")
        check_text_data(data, "command line")
        out, size = train_tokenizer(data, args.vocab_size, args.out)
        print(f"wrote a {size}-entry WordPiece vocabulary (at most {args.vocab_size} asked) learnt on the "
              f"{data.name} training split to {out}; train with data.tokenizer={out} and a model vocabulary of at "
              f"least {size} (model.text.vocab_size, or model.vocab_size for xlnet; pmlm needs one more)")
        return 0
    if args.command == "distill":
        from maskkit.distill import distill

        cfg = configs.load_config(args.config, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / cfg.name
        summary = distill(args.config, args.overrides, out, resume=args.resume, progress=not args.no_progress)
        teacher, student = summary["teacher_test_accuracy"], summary["student_test_accuracy"]
        print(f"distilled {summary['teacher']} into {out / 'hf'} in {summary['seconds']:.0f} s: test accuracy on "
              f"{summary['num_test']} documents, teacher {teacher:.3f}, student {student:.3f} "
              f"({100 * student / max(teacher, 1e-9):.1f}% of the teacher); {out / 'distill.json'}")
        return 0
    if args.command == "analyze":
        import torch

        from maskkit.analyze import analyze, read_texts

        if args.chunk < 1:
            raise MaskkitError(f"--chunk {args.chunk}: give at least 1 target token per feed-forward chunk")
        summary = analyze(args.model, read_texts(args.text, args.text_file), args.out, args.save_vectors, args.chunk,
                          torch.float64 if args.float64 else torch.float32, progress=not args.no_progress,
                          images=args.image)
        stage = "norm" if summary["post_norm"] else "residual"
        ratios = " ".join(f"{row[stage]:.3f}" for row in summary["mixing_ratio"])
        kind = "image" if summary["input"] == "images" else "text"
        print(f"analyzed {summary['num_texts']} {kind}(s) through {summary['model']} "
              f"({summary['seconds_per_text']:.2f} s per {kind}): mixing ratio after attention + residual"
              f"{' + norm' if summary['post_norm'] else ''} by layer {ratios}; {args.out}/summary.json")
        return 0
    if args.command == "debias":
        from maskkit.debias import debias

        report = debias(args.model, args.out, args.classes, args.template, args.spurious, args.attributes, args.pairs,
                        args.eval, args.mode, args.lam, args.seed)
        results = report["results"]
        for name, row in results.items():
            print(f"{name:18s} worst group {row['worst_group']:.3f}  average {row['average']:.3f}  gap {row['gap']:.3f}")
        if "warning" in report:
            print(f"warning: {report['warning']}")
        print(f"{args.out}/report.json, projection.safetensors ({report['mode']}, lambda {report['lam']:g})")
        return 0
    if args.command == "profile":
        import json

        import torch

        from maskkit.efficiency.models import load_profiled
        from maskkit.efficiency.profile import format_table, profile_model
        from maskkit.files import atomic_write_text

        profiled = load_profiled(args.model, args.length, args.image_size, args.tower)
        footprint = profile_model(profiled.module, profiled.make_example, args.batch, repeats=args.repeats,
                                  embedding_tables=profiled.embedding_tables, forward=profiled.forward,
                                  compile=args.compile)
        print(f"{profiled.description} ({profiled.input}, {footprint.dtype}, {footprint.threads} threads, "
              f"{footprint.device}, torch {torch.__version__})")
        print(format_table([(Path(args.model).name or args.model, footprint)]))
        if args.json:
            record = {"model": profiled.description, "input": profiled.input, **footprint.as_dict()}
            atomic_write_text(Path(args.json), json.dumps(record, indent=1))
        return 0
    if args.command == "compress":
        from maskkit.efficiency.compress import compress

        for operation in ("quantize", "prune_heads", "prune_ffn", "prune_unstructured"):
            if getattr(args, operation) is not None:
                break
        if args.batches < 1:
            raise MaskkitError(f"--batches {args.batches}: at least 1")
        report = compress(args.run, operation, getattr(args, operation), args.out, batches=args.batches,
                          test=args.test, batch=args.batch, length=args.length, compile=args.compile,
                          repeats=args.repeats)
        b, a, r = report["before"], report["after"], report["ratios"]
        print(f"{operation.replace('_', '-')} {report['amount']}: {b['quality']['metric']} "
              f"{b['quality']['value']:.3f} -> {a['quality']['value']:.3f} ({100 * r['quality_change']:+.1f} points)")
        print(f"size x{r['size']:.3f} (the blocks' Linear weights x{r['linear_weights']:.3f}), parameters x{r['parameters']:.3f}, FLOPs x{r['flops']:.3f}, latency (batch 1) "
              f"{r['latency_speedup']:.2f}x faster, throughput (batch {a['footprint']['batch']}) "
              f"{r['throughput_speedup']:.2f}x" + (" (compiled)" if args.compile else ""))
        if "sparsity" in report:
            print(f"sparsity {report['sparsity']:.3f} of the blocks' Linear weights; {report['note']}")
        print(f"{report['out']}: a run (maskkit eval / export / profile it); {report['out']}/compress.json")
        return 0
    if args.command == "pareto":
        from maskkit.efficiency.pareto import pareto

        rows = pareto(args.runs, args.out, batch=args.batch, length=args.length, compile=args.compile,
                      repeats=args.repeats, test=args.test, names=args.names)
        print(f"{'run':40s} {rows[0]['metric']:>22s} {'latency ms':>10s} {'size MB':>8s}  front")
        for r in rows:
            marks = ",".join(k for k, key in (("latency", "front_latency_ms"), ("size", "front_size_mb")) if r.get(key))
            print(f"{r['name'][:40]:40s} {r['quality']:22.3f} {r['latency_ms']:10.2f} {r['size_mb']:8.1f}  {marks}")
        print(f"{args.out}/pareto.png, pareto.json")
        return 0
    if args.command == "export":
        from maskkit.export import export_run

        print(export_run(args.path, *args.to))
        return 0
    if args.command == "validate":
        from maskkit.train.loop import check_before_training

        cfg = configs.load_config(args.config, args.overrides)
        check_before_training(cfg)
        print(f"{args.config}: ok ({cfg.method}, {cfg.train.steps} steps, batch {cfg.train.batch_size})")
        return 0
    if args.command == "train":
        from maskkit.train.loop import resume_config, train

        if args.extend_steps is not None and not args.resume:
            raise MaskkitError(f"--extend-steps {args.extend_steps} continues a run: pass --resume too")
        if args.extend_steps is not None and args.extend_steps < 1:
            raise MaskkitError(f"--extend-steps must be an integer >= 1, got {args.extend_steps}")
        cfg = configs.load_config(args.config, args.overrides)
        out = Path(args.out or Path("runs") / cfg.name)
        if args.resume:
            # A resumed run trains the config it was started with; overrides may only restate it or change
            # how it runs (train.threads, ...), which `train` checks.
            recipe, cfg = cfg, resume_config(out, args.overrides)
            check_resume_recipe(args.config, recipe, cfg, out)
        if args.allow_reshard and not args.resume:
            raise MaskkitError("--allow-reshard continues a run on another number of ranks: pass --resume too")
        result = train(cfg, out, resume=args.resume, progress=not args.no_progress,
                       extend_steps=args.extend_steps or 0, allow_reshard=args.allow_reshard)
        if os.environ.get("RANK", "0") == "0":
            print(f"trained {cfg.method} for {result.final_step} steps, final loss {result.final_loss:.4f}; run in {out}")
        return 0
    if args.command == "eval":
        from maskkit.eval.run import evaluate

        result = evaluate(args.path, args.protocol, args.overrides, device=args.device)
        print(format_eval(result))
        if result.get("not_recorded"):
            # The result is printed, so the work is not lost; the status says it was not saved.
            raise MaskkitError(f"the result above is not recorded: {result['not_recorded']}")
        return 0
    if args.command == "demo":
        from maskkit.demo import demo, demo_flip, demo_text

        overrides = list(args.overrides)
        which = overrides.pop(0) if overrides and "=" not in overrides[0] else "mae"
        if which not in ("mae", "flip", "text"):
            raise MaskkitError(f"maskkit demo {which}: choose mae (the default), flip or text")
        if which == "text":
            demo_text(Path(args.out or "runs/demo-text"), overrides, progress=not args.no_progress)
        elif which == "flip":
            demo_flip(Path(args.out or "runs/demo-flip"), overrides, progress=not args.no_progress)
        else:
            demo(Path(args.out or "runs/demo"), overrides, progress=not args.no_progress)
        return 0
    raise AssertionError(args.command)
