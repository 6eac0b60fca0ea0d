"""Where chunks run: the caller itself (``serial``) or a loky process pool (``loky``)."""
