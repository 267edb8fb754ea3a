#!/usr/bin/env python
"""Installs efficientps_d2. detectron2 is not on PyPI: install it first (see README, "Set-up")."""

from setuptools import find_packages, setup

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
    package_data={"efficientps_d2": ["model_zoo/configs/**/*.yaml", "model_zoo/configs/*.yaml"]},
    install_requires=[
        "torch>=1.13",
        "torchvision>=0.14",
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
