"""``python -m rslib.eval --generated DIR --real DIR --out results.json [--clip DIR] [--segmenter DIR]
[--detector DIR] [--inception FILE]``: see :mod:`rslib.eval.evaluate`."""
from rslib.eval.evaluate import main

if __name__ == "__main__":
    main()
