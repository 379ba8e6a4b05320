"""Phase 1 of a ``protocol=features`` run: the autoencoder(s), by ``protocol.autoencoder.training``.

``local``: each site trains its own (the paper); ``federated``: ``autoencoder.rounds``
rounds of Flower's FedAvg aggregation, so all latents share one space; ``public``: the
server trains one on training images outside every site's partition.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import FedAvg

from graftfl.core.autoencoder import conv_ae, train_autoencoder
from graftfl.core.normalization import standardized
from graftfl.strategies.replies import averaged_by_flower, metrics_problem, reply_problem
from graftfl.strategies.utils import in_partition_order

PROTOCOL = "features"
MESSAGE_TYPE = f"train.{PROTOCOL}"
logger = logging.getLogger(__name__)


class AutoencoderPhase:
    """The autoencoder phase of :class:`~graftfl.strategies.features.phases.FeatureRun`.

    A mixin: it uses the run's ``nodes``, ``message``, ``exchange`` and ``log``.
    """

    def prepare_autoencoders(self) -> ArrayRecord | None:
        """Train the autoencoder(s); returns the weights to hand to the sites (None: local)."""
        mode = self.protocol.autoencoder.training
        self.run.round_seconds()
        if mode == "local":
            replies = self.checked(self.exchange([self.message(node, MESSAGE_TYPE, phase="autoencoder") for node in self.nodes]))
            self.log_autoencoder_round(replies)
            return None
        if mode == "federated":
            return self.federated_autoencoder()
        return self.public_autoencoder()

    def checked(self, replies: list[Message], sent: ArrayRecord | None = None) -> list[Message]:
        """The replies whose metrics (and, federated, weights) may be used; each refused one is recorded.

        A site is untrusted: a NaN partition id or a missing metrics record stopped the server,
        and federated weights of another shape or with NaN would end or poison the average
        (the checks of FedAvg's replies against the weights ``sent``).
        """
        reference = None if sent is None else {key: array.numpy() for key, array in sent.items()}
        good = []
        for reply in replies:
            problem = metrics_problem(reply.content, counts=("partition-id",), finite=("client_flops",), present=("ae_loss",))
            if problem is None and reference is not None:
                problem = reply_problem(reply.content, reference)
            if problem is None:
                good.append(reply)
            else:
                self.reject(reply.metadata.src_node_id, "autoencoder", problem)
        return good

    def log_autoencoder_round(self, replies: list[Message]) -> None:
        """Record the metrics row of one autoencoder round from the sites' replies."""
        metrics = sorted((dict(reply.content["metrics"]) for reply in replies), key=lambda m: m["partition-id"])
        losses = [m["ae_loss"] for m in metrics]
        self.log(
            phase="autoencoder",
            ae_training=self.protocol.autoencoder.training,
            ae_loss=float(np.mean(losses)) if losses else None,
            client_flops=sum(m["client_flops"] for m in metrics),
            clients=[int(m["partition-id"]) for m in metrics],
            client_ae_loss=losses,
        )

    def federated_autoencoder(self) -> ArrayRecord:
        """Train the autoencoder with FedAvg over the sites; returns the final weights."""
        torch.manual_seed(self.cfg.seed)  # before the model is built: ``seed`` sets the initial weights
        model = conv_ae(self.run.input_shape, latent_dim=int(self.protocol.latent_dim), channels=int(self.protocol.conv_channels))
        arrays = ArrayRecord(model.state_dict())
        aggregator = FedAvg()  # Flower's weighted average ("num-examples") of the replies' ArrayRecords
        for server_round in range(1, int(self.protocol.autoencoder.rounds) + 1):
            messages = [self.message(node, MESSAGE_TYPE, {"arrays": arrays}, phase="autoencoder", **{"server-round": server_round}) for node in self.nodes]
            replies = in_partition_order(self.checked(self.exchange(messages), arrays))  # Flower sums in the order given
            if not replies:
                raise RuntimeError("no site returned autoencoder weights")
            arrays, _ = aggregator.aggregate_train(server_round, averaged_by_flower(replies))
            self.log_autoencoder_round(replies)
            logger.info("[features] federated autoencoder round %s/%s", server_round, self.protocol.autoencoder.rounds)
        return arrays

    def public_autoencoder(self) -> ArrayRecord:
        """Train on training images no site holds (the draw ``partition_indices`` leaves over)."""
        raw, protocol = self.run.raw, self.protocol
        assigned = int(self.cfg.partition.samples_per_client) * int(self.cfg.num_clients)
        order = np.random.default_rng(self.cfg.seed).permutation(len(raw.train_y))
        public = order[assigned : assigned + int(protocol.public_samples)]
        if len(public) == 0:
            raise ValueError(f"no training images are left outside the {assigned} the sites hold; lower partition.samples_per_client")
        torch.manual_seed(self.cfg.seed)
        model = conv_ae(raw.input_shape, latent_dim=int(protocol.latent_dim), channels=int(protocol.conv_channels))
        images = standardized(raw.train_x[public], self.run.statistics())  # as the sites standardize theirs
        result = train_autoencoder(model, images, epochs=int(protocol.autoencoder.epochs), batch_size=int(protocol.autoencoder.batch_size), lr=float(protocol.autoencoder.lr), device=self.run.device, seed=self.cfg.seed)
        self.log(phase="autoencoder", ae_training="public", ae_loss=result["ae_loss"], public_samples=len(public))
        return ArrayRecord(model.cpu().state_dict())
