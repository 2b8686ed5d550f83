"""Install script for xrapture."""

import os
import re

from setuptools import find_packages
from setuptools import setup

_HERE = os.path.dirname(os.path.abspath(__file__))


def _get_version():
  """Returns `__version__` from xrapture/__init__.py, without importing it."""
  with open(os.path.join(_HERE, 'xrapture', '__init__.py')) as f:
    match = re.search(r'^__version__\s*=\s*[\'"]([^\'"]+)[\'"]', f.read(),
                      re.MULTILINE)
  if match is None:
    raise ValueError('`__version__` not defined in xrapture/__init__.py')
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
    long_description=_get_long_description(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['xrapture', 'xrapture.*'],
                           exclude=['xrapture_test', 'xrapture_test.*']),
    python_requires='>=3.10',
    install_requires=[
        'absl-py>=1.0',
        'dm-haiku>=0.0.12',
        'jax>=0.4.30',
        'jaxlib>=0.4.30',
        'ml_collections>=0.1.1',
        'numpy>=1.24',
        'optax>=0.2.2',
        'safetensors>=0.4',
    ],
    extras_require={
        'tests': [
            'chex',
            'pytest',
            'pytest-xdist',
            # Third-party Haiku models in xrapture_test/third_party_test.py.
            # alphafold-colabfold imports colabfold_kernels without declaring it.
            'alphafold-colabfold>=2.3.6',
            'colabfold-kernels>=0.9.0',
            'haiku-geometric>=0.0.5',
            'jraph>=0.0.6.dev0',
        ],
        'experiments': [
            'matplotlib',
            'tqdm',
        ],
        # Comparison against HuggingFace PEFT. torch is pinned to the CPU build
        # that lies on the CI machines' disk: an open range pulls a multi-GB
        # CUDA build.
        'peft': [
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
