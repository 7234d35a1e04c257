// StopStrings: ends generation at the first of some strings ("<|im_end|>", "\nUser:") and
// keeps them out of the printed text, while still printing as text arrives. It holds back
// only the tail that could be the start of a stop string; the rest is safe to print.
//
//   StopStrings stops({"<|im_end|>"});
//   for (id : generated) {
//     std::cout << stops.push(streamer.push(tok.token_to_piece(id)));
//     if (stops.stopped()) break;
//   }
//   std::cout << stops.finish();
//
// Matching is on bytes, after UTF-8 completion, so a stop string split across tokens (the
// byte tokenizer spells "<|im_end|>" in ten) is found all the same.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace flotilla::text {

class StopStrings {
 public:
  // Empty strings are ignored; no strings: push returns its input unchanged.
  explicit StopStrings(std::vector<std::string> stops);

  // Appends generated text; returns what can be printed now. Once a stop string has
  // appeared, returns the text before it and stopped() turns true; later pushes return "".
  std::string push(std::string_view text);
  bool stopped() const { return stopped_; }
  // Generation ended without a stop string: the held-back tail, which is plain text after all.
  std::string finish();

 private:
  std::vector<std::string> stops_;
  std::string pending_;  // held back: a suffix that is a proper prefix of some stop string
  bool stopped_ = false;
};

}  // namespace flotilla::text
