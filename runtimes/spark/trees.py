"""The tree models of the ``spark`` runtime's fast path: decision trees, random forests and
gradient-boosted trees, for regression and classification, walked as flat node arrays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ketch.runtimes.spark.saved import StageMeta, read_json_metadata, read_table
from ketch.runtimes.spark.stage import Classifier, Columns, Predictor, as_floats


class Forest:
    """The trees of a model as flat node arrays, walked for all rows and trees at once.

    Leaves point to themselves, so walking every row ``depth`` steps lands each on its leaf
    whatever the depth of its path.
    """

    def __init__(self, data: Mapping[str, list[Any]], tree_ids: Sequence[int]) -> None:
        node_ids = data["id"]
        order = sorted(range(len(node_ids)), key=lambda i: (tree_ids[i], node_ids[i]))
        place = {(tree_ids[i], node_ids[i]): at for at, i in enumerate(order)}
        count = len(order)
        self.feature = np.zeros(count, dtype=np.intp)
        self.threshold = np.full(count, np.inf)
        self.left = np.arange(count)
        self.right = np.arange(count)
        self.categorical = np.zeros(count, dtype=bool)
        self.category_row = np.zeros(count, dtype=np.intp)
        self.prediction = np.asarray([data["prediction"][i] for i in order], dtype=np.float64)
        self.stats = [data["impurityStats"][i] for i in order]
        categories: list[list[float]] = [[]]
        for at, i in enumerate(order):
            tree = tree_ids[i]
            if data["leftChild"][i] < 0:
                continue
            self.left[at] = place[(tree, data["leftChild"][i])]
            self.right[at] = place[(tree, data["rightChild"][i])]
            self.feature[at] = data["split.featureIndex"][i]
            split = data["split.leftCategoriesOrThreshold"][i]
            if data["split.numCategories"][i] == -1:
                self.threshold[at] = split[0]
            else:  # goes left when the value is one of these categories
                self.categorical[at] = True
                self.category_row[at] = len(categories)
                categories.append(split)
        width = int(max((max(c, default=0) for c in categories), default=0)) + 1
        self.left_categories = np.zeros((len(categories), width), dtype=bool)
        for row, values in enumerate(categories):
            self.left_categories[row, np.asarray(values, dtype=np.intp)] = True
        self.roots = np.asarray([place[(tree, 0)] for tree in sorted(set(tree_ids))], dtype=np.intp)
        self.depth = self._depth()
        self.num_features = int(self.feature.max()) + 1 if count else 0

    def _depth(self) -> int:
        depth, level = 0, self.roots
        while True:
            inner = level[self.left[level] != level]
            if not len(inner):
                return depth
            depth += 1
            level = np.concatenate([self.left[inner], self.right[inner]])

    def leaves(self, features: np.ndarray) -> np.ndarray:
        """``(rows, trees)``: the leaf each row reaches in each tree."""
        nodes = np.tile(self.roots, (len(features), 1))
        rows = np.arange(len(features))[:, None]
        has_categorical = bool(self.categorical.any())
        width = self.left_categories.shape[1]
        for _ in range(self.depth):
            values = features[rows, self.feature[nodes]]
            left = values <= self.threshold[nodes]  # NaN goes right, as in Spark
            if has_categorical:
                whole = np.isfinite(values) & (values >= 0) & (values < width)
                whole &= values == np.floor(np.where(whole, values, 0.0))
                index = np.where(whole, values, 0.0).astype(np.intp)
                member = whole & self.left_categories[self.category_row[nodes], index]
                left = np.where(self.categorical[nodes], member, left)
            nodes = np.where(left, self.left[nodes], self.right[nodes])
        result: np.ndarray = nodes
        return result


def _forest(meta: StageMeta) -> tuple[Forest, np.ndarray]:
    """The model's trees and their weights (1.0 each for a single tree)."""
    data = read_table(meta.folder / "data")
    if "treeID" in data:
        nodes = {key.removeprefix("nodeData."): value for key, value in data.items()}
        forest = Forest(nodes, data["treeID"])
        trees = read_table(meta.folder / "treesMetadata")
        order = sorted(range(len(trees["_1"])), key=lambda i: trees["_1"][i])
        weights = np.asarray([trees["_3"][i] for i in order], dtype=np.float64)
    else:
        forest = Forest(data, [0] * len(data["id"]))
        weights = np.ones(1)
    if len(weights) != len(forest.roots):
        raise ValueError(f"{len(weights)} tree weights for {len(forest.roots)} trees")
    return forest, weights


def _num_features(meta: StageMeta, forest: Forest) -> int:
    return int(_metadata_extra(meta, "numFeatures", forest.num_features))


def _metadata_extra(meta: StageMeta, key: str, default: Any) -> Any:
    # Tree models keep numFeatures / numClasses beside the params in their metadata JSON.
    return read_json_metadata(meta.folder).get(key, default)


class TreeRegressor(Predictor):
    """DecisionTreeRegressionModel, RandomForestRegressionModel, GBTRegressionModel."""

    def __init__(self, meta: StageMeta) -> None:
        self.forest, self.weights = _forest(meta)
        self.ensemble = meta.name.removesuffix("Regressor")
        super().__init__(meta, _num_features(meta, self.forest))

    def transform(self, columns: Columns) -> None:
        leaves = self.forest.leaves(self.vectors(columns))
        predictions = self.forest.prediction[leaves]
        if self.prediction:
            columns[self.prediction] = _combine(self.ensemble, predictions, self.weights)


def _combine(ensemble: str, predictions: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The trees' predictions ``(rows, trees)`` summed tree by tree, in Spark's order."""
    total = np.zeros(len(predictions))
    if ensemble == "GBT":
        for tree in range(predictions.shape[1]):
            total += predictions[:, tree] * weights[tree]
        return total
    for tree in range(predictions.shape[1]):
        total += predictions[:, tree]
    return total / predictions.shape[1] if ensemble == "RandomForest" else total


class TreeClassifier(Classifier):
    """DecisionTreeClassificationModel, RandomForestClassificationModel, GBTClassificationModel
    (binary; its trees are regression trees)."""

    def __init__(self, meta: StageMeta) -> None:
        self.forest, self.weights = _forest(meta)
        self.ensemble = meta.name.removesuffix("Classifier")
        classes = 2 if self.ensemble == "GBT" else int(_metadata_extra(meta, "numClasses", 0))
        if self.ensemble != "GBT":
            stats = self.forest.stats
            if classes <= 0:
                classes = max(len(s) for s in stats)
            self.counts = np.zeros((len(stats), classes))
            for at, counts in enumerate(stats):
                self.counts[at, : len(counts)] = counts
        super().__init__(meta, _num_features(meta, self.forest), classes)

    def raw(self, features: np.ndarray) -> np.ndarray:
        leaves = self.forest.leaves(features)
        if self.ensemble == "GBT":
            margin = _combine("GBT", self.forest.prediction[leaves], self.weights)[:, None]
            return np.hstack([-margin, margin])
        if self.ensemble == "DecisionTree":
            counts: np.ndarray = self.counts[leaves[:, 0]]
            return counts
        votes = np.zeros((len(features), self.num_classes))
        for tree in range(leaves.shape[1]):
            counts = self.counts[leaves[:, tree]]
            total = counts.sum(axis=1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                votes += np.where(total != 0, counts / total, 0.0)
        return votes

    def probability(self, raw: np.ndarray) -> np.ndarray:
        if self.ensemble == "GBT":
            # Spark's log loss: P(0) = 1 / (1 + exp(-2 * raw[0])), P(1) = 1 - P(0).
            with np.errstate(over="ignore"):
                first = 1.0 / (1.0 + np.exp(-2.0 * raw[:, :1]))
            return np.hstack([first, 1.0 - first])
        total = raw.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            return as_floats(raw / total)
