"""The app's views as functions of (state, store): the labelling card, the cluster view and the agreement view.
Every read and write goes through pipeline.store.FeedbackStore."""

from __future__ import annotations

import hmac
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from annotation_app import services  # noqa: E402
from pipeline import change_maps  # noqa: E402
from pipeline.store import KEYS, MEANINGS, FeedbackStore  # noqa: E402

# Streamlit keeps R (rerun) and C (clear caches) for itself, so a button cannot take R as its shortcut; a script
# placed once in the page maps R to the Unrealistic button (and stops Streamlit's rerun), outside text fields
KEY_BRIDGE = """<script>
const page = window.parent.document;
if (!page.getElementById("cfkd-keys")) {
  const script = page.createElement("script");
  script.id = "cfkd-keys";
  script.textContent = `window.addEventListener("keydown", (event) => {
    const target = event.target;
    if (event.key.toLowerCase() !== "r" || event.ctrlKey || event.metaKey || event.altKey) return;
    if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.isContentEditable)) return;
    const button = [...document.querySelectorAll("button")].find((b) => b.innerText.trim() === "Unrealistic (R)");
    if (button) { event.preventDefault(); event.stopImmediatePropagation(); button.click(); }
  }, true);`;
  page.head.appendChild(script);
}
</script>"""
PANEL = 180  # px per image at zoom 1: four panels side by side fit a 1280 x 800 screen beside the sidebar
ZOOMS = (1, 2, 3)


def token_gate(expected: str) -> bool:
    """Without the right token (URL ?token=... or typed) the app shows nothing else."""
    given = st.query_params.get("token", "") or st.session_state.get("token", "")
    if given and hmac.compare_digest(str(given), expected):
        return True
    st.title("cfkd annotation")
    st.text_input("Access token", type="password", key="token")
    if st.session_state.get("token"):
        st.error("Wrong access token.")
    return False


def _scale_bar(cmap: str, norm, ticks: list, names: list[str]) -> bytes:
    fig, ax = plt.subplots(figsize=(3, 0.35))
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=ax, orientation="horizontal")
    ax.set_xticks(ticks, names, fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


@st.cache_data
def colour_bar() -> bytes:
    return _scale_bar("RdBu_r", plt.Normalize(-1, 1), [-1, 0, 1], ["darker", "0", "brighter"])


@st.cache_data
def distance_bar() -> bytes:
    return _scale_bar("magma", plt.Normalize(0, 1), [0, 1], ["no change", "any colour change"])


@st.cache_data(max_entries=512, show_spinner=False)
def picture(path: str, width: int) -> bytes:
    """An image enlarged pixel by pixel to at least ``width`` (the browser then only shrinks it: no blur)."""
    array = change_maps.read(Path(path))
    return change_maps.png(array, change_maps.scale_for(width, array.shape[1]))


@st.cache_data(max_entries=512, show_spinner=False)
def colour_picture(original: str, counterfactual: str, width: int) -> bytes:
    array = change_maps.colour_change(
        change_maps.read(Path(original)), change_maps.read(Path(counterfactual))
    )
    return change_maps.png(array, change_maps.scale_for(width, array.shape[1]))


@st.cache_data(max_entries=64, show_spinner=False)
def members_sheet(paths: tuple[str, ...]) -> bytes:
    return change_maps.contact_sheet([Path(p) for p in paths])


@st.cache_data(max_entries=64, show_spinner=False)
def flicker_picture(original: str, counterfactual: str, width: int) -> bytes:
    side = change_maps.read(Path(original)).shape[1]
    return change_maps.flicker_gif(Path(original), Path(counterfactual), change_maps.scale_for(width, side))


def _label(store: FeedbackStore, ids: list[str], cf_id: str, annotator: str, label: str, round: int) -> None:
    store.add(cf_id, annotator, label, round, st.session_state.get(f"comment-{cf_id}", ""))
    st.session_state.setdefault("history", []).append(cf_id)
    position = ids.index(cf_id)
    st.session_state["current"] = ids[position + 1] if position + 1 < len(ids) else cf_id
    st.session_state["last"] = f"{cf_id}: {label}"


def _undo(store: FeedbackStore, cf_id: str, annotator: str, round: int) -> None:
    """Undo the last label this session made (or the shown card's) and go back to that card."""
    history = st.session_state.get("history", [])
    target = history.pop() if history else cf_id
    restored = store.undo(target, annotator, round)
    st.session_state["current"] = target
    st.session_state["last"] = f"{target}: undone ({'no label' if restored in (None, 'none') else restored})"


def _move(ids: list[str], cf_id: str, step: int) -> None:
    st.session_state["current"] = ids[min(max(ids.index(cf_id) + step, 0), len(ids) - 1)]


def _zoom() -> None:
    st.session_state["zoom"] = ZOOMS[(ZOOMS.index(st.session_state.get("zoom", 1)) + 1) % len(ZOOMS)]


def _flicker() -> None:
    st.session_state["flicker"] = not st.session_state.get("flicker", False)


def _apply(store, groups: pd.DataFrame, cf_id: str, annotator: str, label: str, round: int) -> None:
    added = services.apply_to_cluster(store, groups, cf_id, annotator, label, round)
    st.session_state["last"] = f"{cf_id}: '{label}' applied to {added} card(s) of its cluster"


def _p(row: pd.Series, which: str, name: str) -> str:
    before, after = (float(row.get(f"p_{which}_{when}", float("nan"))) for when in ("before", "after"))
    show = lambda v: "—" if v != v else f"{v:.2f}"  # noqa: E731  (NaN: a manifest from before the column)
    return f"p({name}) {show(before)} &rarr; {show(after)}"


def _panels(row: pd.Series, flicker: bool) -> list[tuple[str, str, callable]]:
    """(caption, problem, draw(column, width)) for original, counterfactual, brightness and colour change."""
    problem = {k: services.image_problem(row[k]) for k in ("original", "counterfactual", "difference")}
    both = problem["original"] or problem["counterfactual"]
    o, c, d = (str(row[k]) for k in ("original", "counterfactual", "difference"))
    return [
        ("original", problem["original"], lambda col, w: col.image(picture(o, w), width=w)),
        (
            "flicker: original ⇄ counterfactual" if flicker else "counterfactual",
            both if flicker else problem["counterfactual"],
            lambda col, w: col.image(flicker_picture(o, c, w) if flicker else picture(c, w), width=w),
        ),
        (
            "brightness change (red brighter, blue darker)",
            problem["difference"],
            lambda col, w: (col.image(picture(d, w), width=w), col.image(colour_bar(), width=w)),
        ),
        (
            "colour change (any hue or brightness)",
            both,
            lambda col, w: (col.image(colour_picture(o, c, w), width=w), col.image(distance_bar(), width=w)),
        ),
    ]


def card(
    row: pd.Series,
    store: FeedbackStore,
    annotator: str,
    round: int,
    ids: list[str],
    mine: str | None,
    groups: pd.DataFrame | None = None,
) -> None:
    """original | counterfactual | brightness change | colour change, the class probabilities before -> after,
    verdict buttons T / S / U / R, Back / Next (arrows), Undo (Z), Zoom (E), Flicker (F) and, with clusters,
    Apply to cluster (A). Streamlit shows each button's key beside its label: everything works from the keyboard."""
    source, target = row["source_class"], row["target_class"]
    st.markdown(
        f"**{source} &rarr; {target}** &middot; attempt {row['attempt']} &middot; {_p(row, 'source', source)} "
        f"&middot; {_p(row, 'target', target)} &middot; `{row['id']}`"
    )
    zoom, flicker = st.session_state.get("zoom", 1), st.session_state.get("flicker", False)
    panels = _panels(row, flicker)
    per_row = 4 if zoom == 1 else 2
    width = PANEL * zoom * 4 // (2 * per_row) if zoom > 1 else PANEL
    reported = set()
    for start in range(0, len(panels), per_row):
        for column, (caption, problem, draw) in zip(st.columns(per_row), panels[start : start + per_row]):
            if problem in reported:  # a map of an image already reported: one error line per problem
                column.caption(f"{caption}: not available")
            elif problem:  # one line in place of the image; the card can still be judged or skipped
                column.error(problem)
                reported.add(problem)
            else:
                draw(column, width)
                column.caption(caption)
    verdicts = st.columns(len(KEYS) + 1)
    for column, (label, key) in zip(verdicts, KEYS.items()):
        bridged = key == "R"
        column.button(
            f"{label.capitalize()} (R)" if bridged else label.capitalize(),
            key=f"label-{label}",
            shortcut=None if bridged else key,
            help=MEANINGS[label],
            type="primary" if mine == label else "secondary",
            on_click=_label,
            args=(store, ids, row["id"], annotator, label, round),
        )
    verdicts[-1].button(
        "Undo", key="undo", shortcut="Z", on_click=_undo, args=(store, row["id"], annotator, round)
    )
    st.iframe(KEY_BRIDGE, height=1)
    tools = st.columns(5)
    tools[0].button("Back", key="prev", shortcut="Left", on_click=_move, args=(ids, row["id"], -1))
    tools[1].button("Next", key="next", shortcut="Right", on_click=_move, args=(ids, row["id"], 1))
    tools[2].button(f"Zoom {zoom}x", key="zoom", shortcut="E", on_click=_zoom, help="1x, 2x, 3x: real pixels")
    tools[3].button(
        "Flicker", key="flicker", shortcut="F", on_click=_flicker, type="primary" if flicker else "secondary"
    )
    st.caption(f"your label: **{mine or '—'}**")
    if groups is not None and row["id"] in groups.index:
        cluster_strip(tools[4], row, groups, store, annotator, round, mine)
    st.text_input("Comment (optional, saved with your next verdict)", key=f"comment-{row['id']}")


def cluster_strip(button_column, row, groups: pd.DataFrame, store, annotator: str, round: int, mine) -> None:
    """The card's cluster: one key press gives the card's verdict to its members, which are shown below."""
    me = groups.loc[row["id"]]
    members = [i for i in groups.index[groups["cluster"].to_numpy() == me["cluster"]] if i != row["id"]]
    button_column.button(
        f"Apply to cluster ({len(members)})",
        key="cluster-apply",
        shortcut="A",
        disabled=mine not in KEYS or not members,
        help="give your verdict on this card to the other cards of its cluster (cards you judged one by one keep theirs)",
        on_click=_apply,
        args=(store, groups, row["id"], annotator, mine, round),
    )
    role = "representative of" if me["representative"] else "member of"
    st.caption(
        f"{role} cluster {int(me['cluster']) + 1} of {groups['cluster'].nunique()}: {len(members)} other card(s) "
        "with a similar change"
    )
    if members:
        st.image(members_sheet(tuple(str(p) for p in groups.loc[members[:16], "counterfactual"])))


def round_header(state: dict, needed: int) -> None:
    """Cards left, the verdicts so far, feedback accuracy, and when ``cfkd run`` can go on."""
    left, verdicts, accuracy, more = st.columns([1, 1.6, 1, 1])
    left.metric("Cards left for you", state["left"])
    verdicts.metric(
        "Verdicts this round",
        " ".join(f"{KEYS[k]}{v}" for k, v in state["verdicts"].items()),
        help=", ".join(f"{KEYS[k]} = {k}" for k in KEYS),
    )
    fa = state["feedback_accuracy"]
    accuracy.metric("Feedback accuracy", "—" if fa is None else f"{fa:.2f}", help="true / (true + spurious)")
    more.metric(
        "cfkd run",
        "ready" if state["more_needed"] == 0 else f"{state['more_needed']} to go",
        help=f"a round needs feedback.min_labels = {needed} verdicts (or all its cards) before distil goes on",
    )


def cluster_view(rnd: services.Round, groups: pd.DataFrame, store: FeedbackStore, annotator: str) -> None:
    st.subheader(f"Clusters of similar changes ({groups['cluster'].nunique()}, chosen from the data)")
    for cluster in sorted(groups["cluster"].unique()):
        ids = groups.index[groups["cluster"] == cluster].tolist()
        members = rnd.manifest.set_index("id").loc[ids]
        with st.expander(f"cluster {cluster + 1}: {len(ids)} counterfactuals", expanded=cluster == 0):
            st.image([str(p) for p in members["difference"][:24]], width=64)
            st.image([str(p) for p in members["counterfactual"][:24]], width=64)
            columns = st.columns(len(KEYS))
            for column, label in zip(columns, KEYS):
                if column.button(f"Label all {label}", key=f"cluster-{cluster}-{label}"):
                    store.add_many(
                        {
                            "cf_id": i,
                            "annotator": annotator,
                            "label": label,
                            "round": rnd.number,
                            "comment": f"{services.CLUSTER_COMMENT}cluster {cluster + 1}",
                        }
                        for i in ids
                    )
                    st.success(
                        f"{len(ids)} counterfactuals labelled {label}; override any of them in the card view."
                    )


def agreement_view(store: FeedbackStore, round: int) -> None:
    st.subheader("Agreement")
    labels = store.labels(round)
    if labels.empty:
        st.info("No labels yet in this round.")
        return
    result = services.agreement(labels)
    kappa = result["fleiss_kappa"]
    st.metric("Fleiss' kappa (all annotators)", "—" if kappa is None else f"{kappa:.3f}")
    st.markdown("Cohen's kappa per annotator pair")
    st.dataframe(result["pairs"], hide_index=True)
    st.markdown("Labels per annotator")
    st.dataframe(result["counts"])
    st.markdown("Consensus (majority; ties are unsure)")
    st.dataframe(store.consensus(round), hide_index=True)
    st.download_button(
        "Export all label events (CSV)", store.events().to_csv(index=False), "feedback.csv", "text/csv"
    )
