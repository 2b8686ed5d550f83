"""Install script for xrapture."""

import os
import re

from setuptools import find_packages
from setuptools import setup

_HERE = os.path.dirname(os.path.abspath(__file__))


_VERSION_FILE = os.path.join('xrapture', '_src', 'version.py')


def _get_version():
  """Returns `__version__` from xrapture/_src/version.py, without importing it."""
  with open(os.path.join(_HERE, _VERSION_FILE)) as f:
    match = re.search(r'^__version__\s*=\s*[\'"]([^\'"]+)[\'"]', f.read(),
                      re.MULTILINE)
  if match is None:
    raise ValueError(f'`__version__` not defined in {_VERSION_FILE}')
  return match.group(1)


def _get_long_description():
  path = os.path.join(_HERE, 'README.md')
  if not os.path.exists(path):
    return ''
  with open(path, encoding='utf-8') as f:
    return f.read()


setup(
    name='xrapture',
    version=_get_version(),
    description='LoRA for JAX + Haiku as a functional transform.',
    license='Apache-2.0',
    long_description=_get_long_description(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['xrapture', 'xrapture.*'],
                           exclude=['xrapture_test', 'xrapture_test.*']),
    # The lowest versions the test command's floor leg installs and tests
    # (tools/floors.py turns these into pins): jax.extend.core.DropVar needs
    # jax 0.10; dm-haiku < 0.0.15 fails to import with it; jax 0.10 needs
    # numpy 2 and Python 3.11.
    python_requires='>=3.11',
    install_requires=[
        'absl-py>=1.0.0',
        'dm-haiku>=0.0.15',
        'jax>=0.10.0',
        'jaxlib>=0.10.0',
        'ml_collections>=0.1.1',
        'numpy>=2.0.0',
        'optax>=0.2.2',
        'safetensors>=0.4.0',
    ],
    extras_require={
        'tests': [
            'chex',
            'pytest',
            'pytest-xdist',
        ],
        # Third-party Haiku models in xrapture_test/third_party_test.py (the
        # test command installs them in its Python 3.11 leg, where they are
        # required; elsewhere the tests needing them skip with a notice).
        # alphafold-colabfold imports colabfold_kernels without declaring it.
        'models': [
            'alphafold-colabfold>=2.3.6',
            'colabfold-kernels>=0.9.0',
            'haiku-geometric>=0.0.5',
            'jraph>=0.0.6.dev0',
        ],
        'experiments': [
            'matplotlib',
            'orbax-checkpoint>=0.12.8',
            'tqdm',
        ],
        # Comparison against HuggingFace PEFT. torch is pinned to the CPU build
        # that lies on the CI machines' disk: an open range pulls a multi-GB
        # CUDA build.
        'peft': [
            'bitsandbytes',
            'peft',
            'torch==2.13.0',
        ],
    },
    classifiers=[
        'Intended Audience :: Science/Research',
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
)
