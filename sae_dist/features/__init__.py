"""Reading a trained SAE: held-out evaluation with the SAE spliced into the LM, feature dashboards
(a static site), steering, and interop (SAELens layout, Neuronpedia JSON).

    sae-dist eval outputs/<date>/<time>                      # the held-out figures and SAEBench core.json
    sae-dist dashboard build outputs/<date>/<time> --features 256 --out /tmp/dash
    sae-dist dashboard serve /tmp/dash --port 8000           # http://127.0.0.1:8000/
    sae-dist steer /path/to/causal_run --feature 12 --value 8 --prompt "The"

Each takes a run folder (with `sae/` inside) or the export folder itself (`cfg.json` +
`sae_weights.safetensors`). Definitions of the spliced metrics: docs/eval.md.
"""
