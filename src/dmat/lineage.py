"""Work in progress."""


def configure(parser):
    pass


def run(args):
    raise NotImplementedError
