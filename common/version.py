__version__ = "0.2.0"  # 0.2: cache schema 2 (row reasons, manifest), teacher class spaces
