"""The campaign's files rebuilt from its state: metrics.csv and the learning curve (and the
plotting library imported ahead of them)."""

from orchestrator.campaign import files
from orchestrator.campaign.files import write_metrics

CLASSES = ("a", "b")


def cycle(n: int) -> dict:
    return {"cycle": n, "labelled": 10 * (n + 1), "labelled_fraction": 0.1 * (n + 1), "trained": True,
            "val_accuracy": 0.5 + 0.1 * n, "test_accuracy": 0.4 + 0.1 * n}


def test_the_learning_curve_is_drawn_again_only_when_a_metric_changed(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(files, "plot_learning_curve", lambda cycles, path: drawn.append(len(cycles)) or path.touch())
    write_metrics(tmp_path, [cycle(0)], CLASSES)
    write_metrics(tmp_path, [cycle(0)], CLASSES)  # saved again after labelling: nothing new
    write_metrics(tmp_path, [cycle(0), {"cycle": 1, "labelled": 20}], CLASSES)  # labelled, not trained
    write_metrics(tmp_path, [cycle(0), cycle(1)], CLASSES)
    assert drawn == [1, 2]
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 3  # header and two trained cycles


def test_a_learning_curve_lost_after_its_metrics_were_written_is_drawn_again(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(files, "plot_learning_curve", lambda cycles, path: drawn.append(len(cycles)) or path.touch())
    write_metrics(tmp_path, [cycle(0)], CLASSES)
    (tmp_path / "learning_curve.png").unlink()
    write_metrics(tmp_path, [cycle(0)], CLASSES)
    assert drawn == [1, 1] and (tmp_path / "learning_curve.png").exists()


def test_plotting_is_warmed_with_the_backend_the_plots_draw_with():
    import sys

    from orchestrator.campaign.loop import warm_plotting

    warm_plotting()
    import matplotlib

    assert "matplotlib.pyplot" in sys.modules
    assert matplotlib.get_backend().lower() == "agg"
