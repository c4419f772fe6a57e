"""Headless matplotlib (Agg): every figure here is written to a file."""


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
