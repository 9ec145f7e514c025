"""``python -m alignkit ...`` is the same as the ``alignkit`` console script (the DeepSpeed launcher uses it)."""

from alignkit.cli import main

if __name__ == "__main__":
    main()
