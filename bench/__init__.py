"""superd's benchmark against a C floor and its peers: ``python -m bench``."""
