// Strict JSON-lines field extraction for `rwkvctl prepare`'s fast path.
//
// One line of a SlimPajama-style file is a JSON object; prepare needs two things from it: the text (a top-level
// string field) and the source label (a dotted path such as meta.redpajama_set_name). Building a Python dict per
// line costs more than the rest of the pipeline, so this parser validates the line and locates both fields without
// building anything.
//
// The contract with the Python reader is one-sided: `parse` says yes only for lines that are strictly valid JSON in
// valid UTF-8 and whose fields it can read unambiguously, and then its answer equals what orjson/json + the Python
// record rules give. Everything else (malformed JSON, invalid UTF-8, a missing, empty, duplicated or non-string
// text, a lone \u surrogate, escaped keys on the path we compare, JSON nested inside a string, NaN, absurd
// nesting) is handed back to Python, which classifies the line exactly as before. So the fast path never changes a
// result; it only skips Python work for ordinary lines.

#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>
#include <vector>

#if defined(__SSE2__) && !defined(RWKVCTL_NO_SIMD)
#include <emmintrin.h>
#endif

namespace jsonl {

// Length of a valid UTF-8 sequence starting with the non-ASCII byte p[0] (Python's rules: no overlongs, no
// surrogates, nothing above U+10FFFF), or 0 when invalid or cut short by `end`.
inline int utf8_length(const uint8_t* p, const uint8_t* end) {
    uint8_t c = p[0];
    int need;
    uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the first continuation byte
    if (c >= 0xC2 && c <= 0xDF) {
        need = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 2;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;  // U+D800..U+DFFF are not characters
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else {
        return 0;
    }
    if (end - p <= need || p[1] < lo || p[1] > hi) return 0;
    for (int k = 2; k <= need; ++k)
        if ((p[k] & 0xC0) != 0x80) return 0;
    return need + 1;
}

// Bit i set when byte q[i] of a 16-byte chunk needs attention inside a string: '"', '\\', a control character
// (< 0x20, invalid JSON) or a non-ASCII byte (to validate UTF-8). Text is the bulk of every line, so this is the
// parser's hot loop: plain ASCII runs cost one compare chain per 16 bytes.
#if defined(__SSE2__) && !defined(RWKVCTL_NO_SIMD)
inline unsigned attention_mask(const uint8_t* q) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i hit = _mm_or_si128(
        _mm_or_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8('"')), _mm_cmpeq_epi8(x, _mm_set1_epi8('\\'))),
        _mm_cmpeq_epi8(_mm_and_si128(x, _mm_set1_epi8(char(0xE0))), _mm_setzero_si128()));  // x < 0x20
    return static_cast<unsigned>(_mm_movemask_epi8(_mm_or_si128(hit, x)));  // x's own top bit: non-ASCII
}
#endif

inline bool needs_attention(uint8_t c) { return c == '"' || c == '\\' || c < 0x20 || c >= 0x80; }

struct Span {  // a JSON string's body, between the quotes (begin == nullptr: absent)
    const uint8_t* begin = nullptr;
    const uint8_t* end = nullptr;
    bool escaped = false;
};

struct Fields {
    Span text;
    int64_t text_len = 0;  // decoded length
    Span source;  // begin == nullptr: no usable source label ("unknown")
};

class LineParser {
  public:
    LineParser(std::string_view text_key, std::vector<std::string_view> source_path)
        : text_key_(text_key), path_(std::move(source_path)) {}

    // Parse one line (no trailing newline). True: `f` holds the text (non-empty, decoded into `text_out`, which
    // needs n + 16 bytes) and the source.
    bool parse(const uint8_t* s, int64_t n, uint8_t* text_out, Fields* f) {
        text_out_ = text_out;
        p_ = s;
        end_ = s + n;
        f_ = f;
        *f = Fields{};
        skip_ws();
        if (p_ >= end_ || *p_ != '{') return false;
        if (!object(0, path_.empty() ? -1 : 0, true)) return false;
        skip_ws();
        if (p_ != end_) return false;  // trailing garbage
        return f->text.begin != nullptr && f->text_len > 0;
    }

  private:
    static constexpr int kMaxDepth = 200;  // deeper lines go to Python (whose own limit then decides)
    static constexpr int kMaxIntegerDigits = 300;

    std::string_view text_key_;
    std::vector<std::string_view> path_;
    const uint8_t* p_ = nullptr;
    const uint8_t* end_ = nullptr;
    Fields* f_ = nullptr;
    uint8_t* text_out_ = nullptr;

    void skip_ws() {
        while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\r' || *p_ == '\n')) ++p_;
    }

    // At an opening quote: validate the string (escapes, UTF-8, no raw controls) and return its body. With `out`,
    // also decode it there in the same pass (`*out_len` bytes; `out` needs 16 bytes of slack past the body's
    // length) and refuse lone \\u surrogates, which have no UTF-8 form.
    bool string(Span* body, uint8_t* out = nullptr, int64_t* out_len = nullptr) {
        const uint8_t* q = ++p_;
        uint8_t* o = out;
        bool escaped = false;
        while (true) {
#if defined(__SSE2__) && !defined(RWKVCTL_NO_SIMD)
            if (end_ - q >= 16) {  // copy 16 bytes ahead (only the part before the first special byte counts)
                if (o != nullptr) _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
                unsigned mask = attention_mask(q);
                if (mask == 0) {
                    q += 16;
                    if (o != nullptr) o += 16;
                    continue;
                }
                int k = __builtin_ctz(mask);
                q += k;
                if (o != nullptr) o += k;
            } else
#endif
            {
                while (q < end_ && !needs_attention(*q)) {
                    if (o != nullptr) *o++ = *q;
                    ++q;
                }
                if (q >= end_) return false;  // unterminated
            }
            const uint8_t c = *q;
            if (c == '"') break;
            if (c >= 0x80) {
                int n = utf8_length(q, end_);
                if (n == 0) return false;
                if (o != nullptr) {
                    std::memcpy(o, q, n);
                    o += n;
                }
                q += n;
                continue;
            }
            if (c != '\\') return false;  // a raw control character: invalid JSON
            escaped = true;
            if (end_ - q < 2) return false;
            const uint8_t e = q[1];
            if (e != 'u') {
                uint8_t decoded;
                switch (e) {
                    case '"': case '\\': case '/': decoded = e; break;
                    case 'b': decoded = '\b'; break;
                    case 'f': decoded = '\f'; break;
                    case 'n': decoded = '\n'; break;
                    case 'r': decoded = '\r'; break;
                    case 't': decoded = '\t'; break;
                    default: return false;
                }
                if (o != nullptr) *o++ = decoded;
                q += 2;
                continue;
            }
            uint32_t cp;
            if (!hex4(q + 2, &cp)) return false;
            q += 6;
            if (o == nullptr) continue;  // undecoded strings may hold lone surrogates (valid JSON)
            if (cp >= 0xDC00 && cp <= 0xDFFF) return false;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                uint32_t low;
                if (end_ - q < 6 || q[0] != '\\' || q[1] != 'u' || !hex4(q + 2, &low) || low < 0xDC00 || low > 0xDFFF)
                    return false;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                q += 6;
            }
            o = put_utf8(cp, o);
        }
        *body = Span{p_, q, escaped};
        if (out_len != nullptr) *out_len = o - out;
        p_ = q + 1;
        return true;
    }

    bool hex4(const uint8_t* h, uint32_t* cp) const {
        if (end_ - h < 4) return false;
        uint32_t v = 0;
        for (int i = 0; i < 4; ++i) {
            uint8_t c = h[i];
            uint32_t d;
            if (c >= '0' && c <= '9') d = c - '0';
            else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f') d = (c | 0x20) - 'a' + 10;
            else return false;
            v = (v << 4) | d;
        }
        *cp = v;
        return true;
    }

    static uint8_t* put_utf8(uint32_t cp, uint8_t* o) {
        if (cp < 0x80) {
            *o++ = static_cast<uint8_t>(cp);
        } else if (cp < 0x800) {
            *o++ = static_cast<uint8_t>(0xC0 | (cp >> 6));
            *o++ = static_cast<uint8_t>(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            *o++ = static_cast<uint8_t>(0xE0 | (cp >> 12));
            *o++ = static_cast<uint8_t>(0x80 | ((cp >> 6) & 0x3F));
            *o++ = static_cast<uint8_t>(0x80 | (cp & 0x3F));
        } else {
            *o++ = static_cast<uint8_t>(0xF0 | (cp >> 18));
            *o++ = static_cast<uint8_t>(0x80 | ((cp >> 12) & 0x3F));
            *o++ = static_cast<uint8_t>(0x80 | ((cp >> 6) & 0x3F));
            *o++ = static_cast<uint8_t>(0x80 | (cp & 0x3F));
        }
        return o;
    }

    bool digits() {
        const uint8_t* start = p_;
        while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
        return p_ > start;
    }

    bool number() {
        if (*p_ == '-') ++p_;
        if (p_ >= end_) return false;
        if (*p_ == '0') {
            ++p_;
        } else {
            const uint8_t* start = p_;
            if (!digits()) return false;
            // Python refuses to convert integers of more than 4300 digits (and orjson overflows far sooner):
            // such a line is Python's to classify.
            if (p_ - start > kMaxIntegerDigits) return false;
        }
        if (p_ < end_ && *p_ == '.') {
            ++p_;
            if (!digits()) return false;
        }
        if (p_ < end_ && (*p_ == 'e' || *p_ == 'E')) {
            ++p_;
            if (p_ < end_ && (*p_ == '+' || *p_ == '-')) ++p_;
            if (!digits()) return false;
        }
        return true;
    }

    bool literal(std::string_view word) {
        if (end_ - p_ < static_cast<int64_t>(word.size()) || std::memcmp(p_, word.data(), word.size()) != 0)
            return false;
        p_ += word.size();
        return true;
    }

    // Any value; `match` >= 0 means this value sits on the source path with `match` components matched.
    bool value(int depth, int match) {
        if (p_ >= end_) return false;
        switch (*p_) {
            case '{':
                return object(depth + 1, match, false);
            case '[':
                return array(depth + 1);
            case '"': {
                Span ignored;
                return string(&ignored);
            }
            case 't':
                return literal("true");
            case 'f':
                return literal("false");
            case 'n':
                return literal("null");
            default:
                return number();
        }
    }

    bool array(int depth) {
        if (depth > kMaxDepth) return false;
        ++p_;
        skip_ws();
        if (p_ < end_ && *p_ == ']') {
            ++p_;
            return true;
        }
        while (true) {
            skip_ws();
            if (!value(depth, -1)) return false;
            skip_ws();
            if (p_ >= end_) return false;
            if (*p_ == ']') {
                ++p_;
                return true;
            }
            if (*p_ != ',') return false;
            ++p_;
        }
    }

    static bool same(const Span& key, std::string_view want) {
        return static_cast<size_t>(key.end - key.begin) == want.size() &&
               std::memcmp(key.begin, want.data(), want.size()) == 0;
    }

    // The value of a key that matched path_[match]: the label itself, or the next object down the path.
    bool path_value(int depth, int match) {
        f_->source = Span{};  // a later duplicate key replaces an earlier one, as in Python's json
        if (p_ >= end_) return false;
        if (match + 1 < static_cast<int>(path_.size())) {
            if (*p_ == '"') return false;  // JSON inside a string (Python parses it again): Python's job
            return *p_ == '{' ? object(depth + 1, match + 1, false) : value(depth, -1);
        }
        if (*p_ != '"') return value(depth, -1);  // not a string: "unknown"
        Span label;
        if (!string(&label)) return false;
        if (label.escaped) return false;
        if (label.end > label.begin) f_->source = label;
        return true;
    }

    bool object(int depth, int match, bool top) {
        if (depth > kMaxDepth) return false;
        ++p_;
        skip_ws();
        if (p_ < end_ && *p_ == '}') {
            ++p_;
            return true;
        }
        const bool compare = top || match >= 0;
        while (true) {
            skip_ws();
            if (p_ >= end_ || *p_ != '"') return false;
            Span key;
            if (!string(&key)) return false;
            if (compare && key.escaped) return false;  // keys we compare must be plain bytes
            skip_ws();
            if (p_ >= end_ || *p_ != ':') return false;
            ++p_;
            skip_ws();
            const bool is_text = top && same(key, text_key_);
            const bool on_path = match >= 0 && same(key, path_[match]);
            if (is_text && on_path) return false;  // one field as both text and label: Python's job
            if (is_text) {
                if (f_->text.begin != nullptr || p_ >= end_ || *p_ != '"') return false;
                if (!string(&f_->text, text_out_, &f_->text_len)) return false;
            } else if (on_path) {
                if (!path_value(depth, match)) return false;
            } else if (!value(depth, -1)) {
                return false;
            }
            skip_ws();
            if (p_ >= end_) return false;
            if (*p_ == '}') {
                ++p_;
                return true;
            }
            if (*p_ != ',') return false;
            ++p_;
        }
    }
};

}  // namespace jsonl
