"""The stages of the known-distribution benchmark (experiments/known-distribution/dvc.yaml), run as
`dmat known-distribution STAGE --truth NAME`. Like every stage, each talks to the others only through files
(dmat.artifacts.known_distribution)."""
