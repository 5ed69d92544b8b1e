"""The stages of the known-distribution benchmark, train and evaluate, run for every truth in one process by
`dmat known-distribution run` (the stage of experiments/known-distribution/dvc.yaml) or one at a time by
`dmat known-distribution STAGE --truth NAME`. Like every stage, each talks to the others only through files
(dmat.artifacts.known_distribution)."""
