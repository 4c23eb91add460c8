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
