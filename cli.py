"""Repository entry point: ``python cli.py fit --config configs/experiment/demo.yaml`` (same as ``rega``)."""

from rega.cli import main

if __name__ == "__main__":
    main()
