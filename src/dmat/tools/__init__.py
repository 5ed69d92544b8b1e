"""Commands that are not pipeline stages: each module has configure(parser) and run(args) -> exit code."""
