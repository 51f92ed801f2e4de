"""`kvsweep train_surrogate`: a KVzap surrogate for any model (`kvsweep.stages.train_surrogate`)."""

import math

from kvsweep.cli.arguments import add_gpus_argument, number, whole

HELP = "train a KVzap surrogate on KVzip+ targets from the model itself"
JOB = True


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="hub id or local folder of the causal LM")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    add_gpus_argument(parser)
    parser.add_argument("--data", required=True, help="prepared documents: JSONL of {id, input_ids}")
    parser.add_argument(
        "--validation-documents", type=whole(1), required=True, help="the last N documents are held out"
    )
    parser.add_argument("--tokens-per-document", type=whole(1), default=512, help="positions drawn per document")
    parser.add_argument("--kvzap-type", choices=["mlp", "linear"], default="mlp")
    parser.add_argument("--hidden-dim", type=whole(1), default=512, help="the MLP's hidden width")
    parser.add_argument("--epochs", type=whole(1), default=15)
    parser.add_argument("--learning-rate", type=number(0, math.inf), default=5e-3)
    parser.add_argument("--batch-size", type=whole(1), default=512)
    parser.add_argument("--seed", type=whole(0, 2**32 - 1), default=0)
    parser.add_argument("--exclude", nargs="*", default=[], help="document lists whose ids must not be used")
    parser.add_argument("--output", required=True, help="folder of the trained surrogate")


def run(args, clock) -> None:
    from kvsweep.stages import train_surrogate

    train_surrogate.run(train_surrogate.TrainSurrogateOptions(
        model=args.model, data=args.data, output=args.output, validation_documents=args.validation_documents,
        dtype=args.dtype, device=args.device, gpus=args.gpus, tokens_per_document=args.tokens_per_document,
        kvzap_type=args.kvzap_type, hidden_dim=args.hidden_dim, epochs=args.epochs,
        learning_rate=args.learning_rate, batch_size=args.batch_size, seed=args.seed, exclude=args.exclude,
    ), clock)  # fmt: skip
