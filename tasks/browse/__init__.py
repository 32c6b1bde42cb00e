"""What the app (app/) shows, as plain functions over a run's stores: trained generators and grids of their images
(generators.py), real vs generated with the nearest training images and the real-trained classifier's scores
(compare.py), the cohorts and rejects (explore.py), the results in MLflow (results.py). Bad input raises
BadInput, whose message the page shows as it is."""


class BadInput(ValueError):
    """Input the app cannot use: the message says what is wrong and, where it helps, which file or what to run."""
