// RWKV World tokenizer encoder: greedy longest-prefix match over UTF-8 bytes, as a compact byte trie.
//
// Exposed through a plain C ABI so Python loads it with ctypes (no torch, no pybind11). Token ids are
// identical to the reference TRIE_TOKENIZER: at each position walk the trie as far as edges exist and
// emit the deepest node that ends a token. Every single byte is a token, so progress is guaranteed.
//
// Layout: nodes with many children (the root and the busy upper levels) get a dense 256-entry child
// table, one L1-friendly load per byte; the long tail of nodes keeps a short sorted edge list that is
// scanned linearly (almost all have 1-4 children). Build with: g++ -O3 -shared -fPIC world_trie.cpp

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <new>
#include <string_view>
#include <utility>
#include <vector>

#include "jsonl_fields.h"

namespace {

constexpr int kDenseMin = 12;  // children at or above this get a dense table

struct Node {
    int32_t token = -1;   // id of the token ending here, -1 if none
    int32_t dense = -1;   // index of this node's 256-entry table in Trie::dense, or -1
    uint32_t edge_begin = 0;
    uint32_t edge_count = 0;
};

struct Trie {
    std::vector<Node> nodes;
    std::vector<int32_t> dense;       // 256 child indices per dense node (-1 = no child)
    std::vector<uint8_t> edge_byte;   // sparse edges, grouped per node, sorted by byte
    std::vector<int32_t> edge_child;
    // Shortcut for the first two bytes of every match: node reached by (b0, b1), or -1. 256 KiB, L2-resident.
    std::vector<int32_t> pair_node;
    int32_t byte_token[256];
    // Decoding: token id -> its bytes, tok_bytes[tok_off[id] : tok_off[id + 1]] (empty for ids not in the vocab).
    std::vector<uint8_t> tok_bytes;
    std::vector<int64_t> tok_off;

    inline int32_t child(int32_t n, uint8_t b) const {
        const Node& node = nodes[n];
        if (node.dense >= 0) return dense[static_cast<size_t>(node.dense) * 256 + b];
        const uint8_t* eb = edge_byte.data() + node.edge_begin;
        for (uint32_t i = 0; i < node.edge_count; ++i) {
            if (eb[i] == b) return edge_child[node.edge_begin + i];
            if (eb[i] > b) break;
        }
        return -1;
    }

    // Longest token starting at src[0]; returns its length (>= 1) and writes its id.
    inline int64_t longest(const uint8_t* src, int64_t n, int32_t* id) const {
        *id = byte_token[src[0]];  // every byte is a token: the fallback match
        if (n < 2) return 1;
        int32_t node = pair_node[(static_cast<uint32_t>(src[0]) << 8) | src[1]];
        if (node < 0) return 1;
        int64_t best = 1;
        if (nodes[node].token >= 0) {
            best = 2;
            *id = nodes[node].token;
        }
        for (int64_t p = 2; p < n; ++p) {
            node = child(node, src[p]);
            if (node < 0) break;
            if (nodes[node].token >= 0) {
                best = p + 1;
                *id = nodes[node].token;
            }
        }
        return best;
    }
};

// Build-time trie with small unsorted child lists (116K nodes for World: a 256-wide table each would
// cost ~120 MB per worker just to build), converted into the compact form above.
struct BuildNode {
    int32_t token = -1;
    std::vector<std::pair<uint8_t, int32_t>> kids;

    int32_t find(uint8_t c) const {
        for (const auto& kv : kids)
            if (kv.first == c) return kv.second;
        return -1;
    }
};

}  // namespace

extern "C" {

// data: all token byte strings concatenated; offsets: n+1 boundaries into data; ids: token id of each.
void* wt_new(const uint8_t* data, const int64_t* offsets, const int32_t* ids, int32_t n) {
    try {
        std::vector<BuildNode> b(1);
        for (int32_t t = 0; t < n; ++t) {
            int32_t cur = 0;
            for (int64_t i = offsets[t]; i < offsets[t + 1]; ++i) {
                uint8_t c = data[i];
                int32_t next = b[cur].find(c);
                if (next < 0) {
                    next = static_cast<int32_t>(b.size());
                    b[cur].kids.emplace_back(c, next);
                    b.emplace_back();  // may reallocate: index, never hold references across this
                }
                cur = next;
            }
            b[cur].token = ids[t];  // a repeated byte string keeps the later id, like the reference's dict
        }
        Trie* trie = new Trie();
        trie->nodes.resize(b.size());
        for (size_t i = 0; i < b.size(); ++i) {
            Node& node = trie->nodes[i];
            node.token = b[i].token;
            auto& kids = b[i].kids;
            std::sort(kids.begin(), kids.end());
            if (i == 0 || static_cast<int>(kids.size()) >= kDenseMin) {
                node.dense = static_cast<int32_t>(trie->dense.size() / 256);
                trie->dense.resize(trie->dense.size() + 256, -1);
                for (const auto& kv : kids) trie->dense[static_cast<size_t>(node.dense) * 256 + kv.first] = kv.second;
            } else {
                node.edge_begin = static_cast<uint32_t>(trie->edge_byte.size());
                for (const auto& kv : kids) {
                    trie->edge_byte.push_back(kv.first);
                    trie->edge_child.push_back(kv.second);
                }
                node.edge_count = static_cast<uint32_t>(kids.size());
            }
        }
        // Every byte must be a token on its own, or greedy matching could stall.
        for (int c = 0; c < 256; ++c) {
            int32_t k = trie->dense[c];
            if (k < 0 || trie->nodes[k].token < 0) {
                delete trie;
                return nullptr;
            }
            trie->byte_token[c] = trie->nodes[k].token;
        }
        int32_t max_id = 0;
        for (int32_t t = 0; t < n; ++t) max_id = std::max(max_id, ids[t]);
        trie->tok_off.assign(static_cast<size_t>(max_id) + 2, 0);
        for (int32_t t = 0; t < n; ++t) trie->tok_off[ids[t] + 1] = offsets[t + 1] - offsets[t];
        for (size_t i = 1; i < trie->tok_off.size(); ++i) trie->tok_off[i] += trie->tok_off[i - 1];
        trie->tok_bytes.resize(static_cast<size_t>(trie->tok_off.back()));
        for (int32_t t = 0; t < n; ++t)
            std::memcpy(trie->tok_bytes.data() + trie->tok_off[ids[t]], data + offsets[t], offsets[t + 1] - offsets[t]);
        trie->pair_node.assign(65536, -1);
        for (int c0 = 0; c0 < 256; ++c0)
            for (int c1 = 0; c1 < 256; ++c1)
                trie->pair_node[(c0 << 8) | c1] = trie->child(trie->dense[c0], static_cast<uint8_t>(c1));
        return trie;
    } catch (const std::bad_alloc&) {
        return nullptr;
    }
}

void wt_free(void* h) { delete static_cast<Trie*>(h); }

// Encode n bytes; out must hold n ids (a token is at least one byte). Returns the number of ids.
int64_t wt_encode(const void* h, const uint8_t* src, int64_t n, int32_t* out) {
    const Trie* t = static_cast<const Trie*>(h);
    int64_t k = 0;
    for (int64_t pos = 0; pos < n;) {
        int32_t id = -1;
        pos += t->longest(src + pos, n - pos, &id);
        out[k++] = id;
    }
    return k;
}

// Encode many documents in one call: doc d is src[offsets[d]:offsets[d+1]]. Appends `eod` after each
// document when eod >= 0. out must hold offsets[ndocs] + ndocs ids; counts[d] receives doc d's length
// (including its eod). Returns the total number of ids written.
int64_t wt_encode_batch(const void* h, const uint8_t* src, const int64_t* offsets, int64_t ndocs, int32_t eod,
                        int32_t* out, int64_t* counts) {
    int64_t k = 0;
    for (int64_t d = 0; d < ndocs; ++d) {
        int64_t start = k;
        k += wt_encode(h, src + offsets[d], offsets[d + 1] - offsets[d], out + k);
        if (eod >= 0) out[k++] = eod;
        counts[d] = k - start;
    }
    return k;
}

// Bytes of n token ids back to back. With out == nullptr only the size is computed. Ids outside the table
// (negative, the end-of-document id, unused ids) decode to nothing; callers range-check ids first.
int64_t wt_decode(const void* h, const int32_t* ids, int64_t n, uint8_t* out) {
    const Trie* t = static_cast<const Trie*>(h);
    const int64_t ntab = static_cast<int64_t>(t->tok_off.size()) - 1;
    const int64_t* off = t->tok_off.data();
    int64_t k = 0;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t id = ids[i];
        if (id < 0 || id >= ntab) continue;
        const int64_t len = off[id + 1] - off[id];
        if (out != nullptr) std::memcpy(out + k, t->tok_bytes.data() + off[id], static_cast<size_t>(len));
        k += len;
    }
    return k;
}

// prepare's fast path: parse, unescape and encode a block of JSON lines in one call (see jsonl_fields.h).
//
// buf holds whole lines, each ending with '\n'. For every line the parser accepts, a document is emitted in order:
// its text (UTF-8, unescaped) appended to `text`, its ids plus `eod` appended to `ids`, and per document the
// 0-based line index, id count, end offset in `text` and source index (-1 = no label). Source labels are
// interned per call into (src_off, src_len) spans of buf, at most max_sources of them; a line with a further new
// label is handed back like any other. Lines the parser declines go to `fallback` (line indices, for Python to
// classify); blank lines are skipped. Capacity: ids len(buf) + lines, text len(buf) + 16, per-line arrays
// `lines`.
// counts receives {documents, ids, fallback lines, sources, text bytes}. Returns 0, or -1 when out of memory.
int64_t wt_encode_jsonl(const void* h, const uint8_t* buf, int64_t len, const char* text_key, const char* source_key,
                        int32_t eod, int32_t* ids, uint8_t* text, int64_t* doc_line, int64_t* doc_count,
                        int64_t* doc_text_end, int32_t* doc_source, int64_t* fallback, int64_t* src_off,
                        int64_t* src_len, int64_t max_sources, int64_t* counts) {
    try {
        std::vector<std::string_view> path;  // split exactly like Python's str.split("."): empty parts included
        std::string_view dotted(source_key);
        for (size_t dot; (dot = dotted.find('.')) != std::string_view::npos; dotted.remove_prefix(dot + 1))
            path.push_back(dotted.substr(0, dot));
        path.push_back(dotted);
        jsonl::LineParser parser(text_key, path);
        int64_t ndocs = 0, nids = 0, nfallback = 0, nsources = 0, ntext = 0, line = 0;
        for (const uint8_t *p = buf, *end = buf + len; p < end; ++line) {
            const uint8_t* nl = static_cast<const uint8_t*>(std::memchr(p, '\n', end - p));
            if (nl == nullptr) break;  // a partial last line is not a line (the reader always ends blocks with one)
            const uint8_t* q = p;
            while (q < nl && (*q == ' ' || *q == '\t' || *q == '\r' || *q == '\v' || *q == '\f')) ++q;
            jsonl::Fields f;
            const uint8_t* line_begin = p;
            p = nl + 1;
            if (q == nl) continue;  // blank line: not a document (Python's bytes.strip() whitespace)
            if (!parser.parse(line_begin, nl - line_begin, text + ntext, &f)) {
                fallback[nfallback++] = line;
                continue;
            }
            int32_t source = -1;
            if (f.source.begin != nullptr) {
                std::string_view label(reinterpret_cast<const char*>(f.source.begin), f.source.end - f.source.begin);
                for (int64_t k = 0; k < nsources && source < 0; ++k)
                    if (std::string_view(reinterpret_cast<const char*>(buf) + src_off[k], src_len[k]) == label)
                        source = static_cast<int32_t>(k);
                if (source < 0) {
                    if (nsources == max_sources) {
                        fallback[nfallback++] = line;
                        continue;
                    }
                    src_off[nsources] = f.source.begin - buf;
                    src_len[nsources] = f.source.end - f.source.begin;
                    source = static_cast<int32_t>(nsources++);
                }
            }
            ntext += f.text_len;
            doc_line[ndocs] = line;
            doc_text_end[ndocs] = ntext;
            doc_source[ndocs] = source;
            ++ndocs;
        }
        // Encode after parsing the whole block: the trie's hot tables stay in cache across documents (~2% faster
        // than alternating parse and encode per line).
        for (int64_t d = 0, start = 0; d < ndocs; start = doc_text_end[d++]) {
            int64_t k = wt_encode(h, text + start, doc_text_end[d] - start, ids + nids);
            if (eod >= 0) ids[nids + k++] = eod;
            nids += k;
            doc_count[d] = k;
        }
        counts[0] = ndocs;
        counts[1] = nids;
        counts[2] = nfallback;
        counts[3] = nsources;
        counts[4] = ntext;
        return 0;
    } catch (const std::bad_alloc&) {
        return -1;
    }
}

}  // extern "C"
