from setuptools import find_packages, setup

setup(
    name="ppx",
    version="0.1.0",
    description="A fast inference engine for NVIDIA PersonaPlex (full-duplex speech-to-speech)",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "frontends", "frontends.*", "voices", "voices.*",
                                    "benchmarks", "benchmarks.*"]),
    package_data={"frontends": ["static/*", "demo_assets/*"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "safetensors",
        "sentencepiece",
        "huggingface_hub",
        "websockets>=13",
        "opuslib",
        "soundfile",      # libsndfile: every WAV/FLAC flavour, read and written
        "soxr",           # libsoxr: high-quality resampling
        "pyloudnorm",     # ITU-R BS.1770 loudness, as the reference normalises voice prompts
        "tqdm",
        "cryptography",   # the self-signed certificate of `ppx-serve --ssl` when none is given
    ],
    # sphn: Kyutai's Ogg-Opus, to check ours against; playwright drives the system Chromium; openai: its
    # Realtime client talks to /v1/realtime in the tests
    extras_require={"test": ["pytest", "sphn", "playwright", "openai[realtime]", "kubernetes-validate"]},
    entry_points={
        "console_scripts": [
            "ppx-serve=frontends.serve.cli:main",
            "ppx-offline=frontends.offline:main",
            "ppx-voice=voices.cli:main",
        ],
    },
)
