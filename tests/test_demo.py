import json

from maskkit.demo import demo


def test_demo_pipeline_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    """`maskkit demo` wiring: pretrain, compare with random init, write figures and numbers, resume."""
    overrides = ["train.steps=3", "train.batch_size=32", "data.photo_crops=64", "model.encoder.depth=1",
                 "model.decoder_depth=1", "eval.probe_epochs=2"]
    summary = demo(tmp_path / "demo", overrides, progress=False)
    for name in ("demo.json", "accuracy.png", "loss_curve.png", "reconstruction.png", "backbone.safetensors"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert json.loads((tmp_path / "demo" / "demo.json").read_text()) == summary
    assert summary["steps"] == 3
    # Well above chance (0.1) even after 3 steps (kNN ~0.7, a 2-epoch probe ~0.3): features, labels and
    # splits are wired together correctly.
    for protocol, floor in (("knn", 0.5), ("linear", 0.2)):
        assert summary[protocol]["random_init"] > floor and summary[protocol]["pretrained"] > floor
    assert "kNN (k=20, T=0.07)" in capsys.readouterr().out
    # Run again: training is complete, so it only evaluates, with the same numbers.
    again = demo(tmp_path / "demo", overrides, progress=False)
    assert {k: again[k] for k in ("knn", "linear")} == {k: summary[k] for k in ("knn", "linear")}


def test_flip_demo_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    from maskkit.cli import main

    code = main(["demo", "flip", "--out", str(tmp_path / "flip"), "train.steps=4", "train.batch_size=32",
                 "data.num_samples=128", "model.encoder.depth=1", "model.text.depth=1", "model.unmasked_steps=1",
                 "--no-progress"])
    assert code == 0
    summary = json.loads((tmp_path / "flip" / "demo.json").read_text())
    assert summary["steps"] == 4 and summary["chance"] == 1 / 24
    for key in ("zero_shot_held_out", "zero_shot_seen", "retrieval_mean_r1"):
        assert set(summary[key]) == {"pretrained", "random_init"}
    assert (tmp_path / "flip" / "zero_shot.png").is_file() and (tmp_path / "flip" / "text.safetensors").is_file()
    assert "zero-shot, held-out pairs" in capsys.readouterr().out


def test_text_demo_end_to_end_on_a_tiny_budget(tmp_path, capsys):
    from maskkit.cli import main

    code = main(["demo", "text", "--out", str(tmp_path / "text"), "train.steps=2", "train.batch_size=8",
                 "data.max_documents=120", "eval.text_epochs=1", "eval.text_max_length=16", "--no-progress"])
    assert code == 0
    summary = json.loads((tmp_path / "text" / "demo.json").read_text())
    assert set(summary["objectives"]) == {"mlm", "xlnet", "pmlm"}
    assert all(run["steps"] == 2 for run in summary["objectives"].values())
    assert set(summary["text_classify"]) == {"MLM (BERT)", "XLNet", "PMLM (UniLMv2)", "random init (BERT-style)",
                                             "random init (XLNet)"}
    assert all(0.0 <= accuracy <= 1.0 for accuracy in summary["text_classify"].values())
    assert set(summary["text_probe"]) == set(summary["text_classify"])
    assert (tmp_path / "text" / "text_classify.png").is_file()
    for objective in ("mlm", "xlnet", "pmlm"):
        assert (tmp_path / "text" / objective / "backbone.safetensors").is_file()
    assert "wiki topic classification" in capsys.readouterr().out
    assert main(["demo", "text", "--out", str(tmp_path / "text"), "model.dim=8"]) == 2


def test_text_demo_trains_mlm_and_pmlm_longer_and_the_users_overrides_win():
    from maskkit.demo import demo_text_config

    for objective in ("mlm", "pmlm"):
        cfg = demo_text_config(objective, [])
        assert (cfg.train.steps, cfg.optim.base_lr, cfg.optim.warmup_steps) == (1000, 1.2e-2, 100)
    assert demo_text_config("xlnet", []).train.steps == 400                # the recipe's: XLNet meets the gate there
    cfg = demo_text_config("mlm", ["train.steps=400", "optim.base_lr=4e-3"])
    assert (cfg.train.steps, cfg.optim.base_lr, cfg.optim.warmup_steps) == (400, 4e-3, 100)
