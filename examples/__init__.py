"""Examples of what the framework takes from a config: a loss term of your own (:mod:`examples.terms`)."""
