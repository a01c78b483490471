from setuptools import find_packages, setup

setup(
    name="dpo",
    version="0.1.0",
    description="Direct Preference Optimization in plain PyTorch",
    packages=find_packages(include=["dpo", "dpo.*"]),
    package_data={"dpo.demo": ["assets/*/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "datasets>=3.0",
        "numpy",
        "tqdm",
        "peft>=0.21",  # LoRA (--lora-r, --adapter)
    ],
    # accelerate only for the tests that run the phi-2-dpo model card's snippet (device_map="auto")
    extras_require={"test": ["pytest", "accelerate"]},
)
