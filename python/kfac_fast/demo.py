"""Main job placeholder: report backends (replaced by the MNIST autoencoder training job)."""
import kfac_fast


def main() -> None:
    for info in kfac_fast.available_backends().values():
        print(info)


if __name__ == "__main__":
    main()
