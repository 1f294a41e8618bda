"""Model cards (`cards`, the template in `templates/`) and `dsg publish`. Imports everything below the
embedded default."""
