"""MLflow runs are independent: a fan-out holds one open per member, each in its own store."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from sae_dist.tracking import MlflowTracker, default_uri


def test_two_runs_open_at_once_in_separate_stores_each_keep_their_own_metrics(tmp_path):
    uris = [default_uri(str(tmp_path / name)) for name in ("n64", "n128")]
    for d in ("n64", "n128"):
        (tmp_path / d).mkdir()
    trackers = [MlflowTracker(uri, "sae-dist", f"sae-{i}") for i, uri in enumerate(uris)]
    for i, t in enumerate(trackers):
        t.log_params({"sae.n_latents": 64 * (i + 1)})
        t.log_metrics({"train/loss": float(i)}, step=1)
    for t in trackers:
        t.finish()
    for i, (uri, t) in enumerate(zip(uris, trackers)):
        run = MlflowClient(uri).get_run(t.run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == f"sae-{i}"
        assert run.data.params == {"sae.n_latents": str(64 * (i + 1))}
        assert run.data.metrics == {"train.loss": float(i)}


def test_a_list_metric_is_logged_as_one_metric_per_entry(tmp_path):
    """A multi-site family's held-out results carry fvu_per_site, a list: the end of a transcoder or CLT
    job logged it to MLflow as one value and failed there."""
    t = MlflowTracker(default_uri(str(tmp_path)), "sae-dist", "clt")
    t.log_metrics({"eval/fvu": 0.5, "eval/fvu_per_site": [0.25, 0.75]}, step=3)
    t.finish()
    run = MlflowClient(default_uri(str(tmp_path))).get_run(t.run_id)
    assert run.data.metrics == {"eval.fvu": 0.5, "eval.fvu_per_site.0": 0.25, "eval.fvu_per_site.1": 0.75}
