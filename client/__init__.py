"""The hospital side: the Flower ClientApp (``client.app``), the site launcher (``client/run.py``) and the site
settings (``client.sites``, format in ``client/sites.toml`` and docs/federation.md)."""
