#!/usr/bin/env python
"""Installs efficientps_d2. detectron2 is not on PyPI: install it first (see README, "Set-up")."""

import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def link_model_zoo_configs():
    """Makes the top-level configs/ visible inside the package as efficientps_d2/model_zoo/configs.

    configs/ stays the single source of truth: at every build the package folder gets a fresh
    symlink to it (a copy where symlinks are impossible), so wheels carry the YAML files as package
    data and ``efficientps_d2.model_zoo`` finds them without the source tree. In an sdist without
    configs/, the copy made when the sdist was built is used as it is.
    """
    source = os.path.join(ROOT, "configs")
    destination = os.path.join(ROOT, "efficientps_d2", "model_zoo", "configs")
    if not os.path.isdir(source):
        return
    if os.path.islink(destination):
        os.unlink(destination)
    elif os.path.isdir(destination):
        shutil.rmtree(destination)
    try:
        os.symlink(os.path.join("..", "..", "configs"), destination, target_is_directory=True)
    except FileExistsError:
        pass  # made by a concurrent build
    except OSError:
        shutil.copytree(source, destination, dirs_exist_ok=True)


link_model_zoo_configs()

setup(
    name="efficientps_d2",
    version="0.1.0",
    description="EfficientPS panoptic segmentation as a Detectron2 extension",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.8",
    packages=find_packages(include=["efficientps_d2", "efficientps_d2.*"]),
    # The configs travel inside the package so that the model zoo works from a wheel.
    package_data={
        "efficientps_d2": [
            "model_zoo/configs/**/*.yaml",
            "model_zoo/configs/*.yaml",
            "model_zoo/configs/**/*.py",  # the LazyConfig twins
        ]
    },
    install_requires=[
        "torch>=2.4",  # torch.amp.GradScaler("cuda"), is_autocast_enabled("cuda")
        "torchvision>=0.19",
        "fvcore",
        "pycocotools",
        "opencv-python-headless",
        "numpy",
        "Pillow",
    ],
    extras_require={
        "eval": ["panopticapi-lite", "cityscapesscripts"],
        "dev": ["pytest", "black", "isort", "flake8"],
    },
)
