#include "flotilla/train/elastic.hpp"

#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <set>

#include "flotilla/base/error.hpp"

namespace flotilla::train {
namespace {

constexpr const char* kElasticComponent = "launch";

std::string_view trim(std::string_view s) {
  const auto space = [](char c) { return c == ' ' || c == '\t' || c == '\r'; };
  while (!s.empty() && space(s.front())) s.remove_prefix(1);
  while (!s.empty() && space(s.back())) s.remove_suffix(1);
  return s;
}

// The whitespace-separated words of a line.
std::vector<std::string_view> words(std::string_view s) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t')) ++i;
    const size_t begin = i;
    while (i < s.size() && s[i] != ' ' && s[i] != '\t') ++i;
    if (i > begin) out.push_back(s.substr(begin, i - begin));
  }
  return out;
}

}  // namespace

std::vector<HostSlots> parse_hostfile(std::string_view text, std::string_view source) {
  std::vector<HostSlots> hosts;
  std::set<std::string, std::less<>> seen;
  int line_no = 0;
  size_t begin = 0;
  while (begin <= text.size()) {
    size_t end = text.find('\n', begin);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(begin, end - begin);
    begin = end + 1;
    ++line_no;
    if (const size_t hash = line.find('#'); hash != std::string_view::npos) line = line.substr(0, hash);
    line = trim(line);
    if (line.empty()) continue;
    const auto fail = [&](const std::string& why) {
      throw InputError(kElasticComponent, fmt::format("{}:{}: {} (expected `host slots=N`)", source, line_no, why));
    };
    const std::vector<std::string_view> w = words(line);
    HostSlots h{std::string(w[0]), 1};
    for (size_t i = 1; i < w.size(); ++i) {
      const size_t eq = w[i].find('=');
      const std::string_view key = w[i].substr(0, eq);
      if (key == "max_slots" || key == "max-slots") continue;  // Open MPI's own limit: not ours to use
      if (key != "slots" || eq == std::string_view::npos)
        fail(fmt::format("'{}' is not slots=N", w[i]));
      const std::string_view value = w[i].substr(eq + 1);
      int slots = 0;
      const auto [ptr, ec] = std::from_chars(value.data(), value.data() + value.size(), slots);
      if (ec != std::errc() || ptr != value.data() + value.size() || slots < 1)
        fail(fmt::format("slots={} is not a positive integer", value));
      h.slots = slots;
    }
    if (!seen.insert(h.host).second) fail(fmt::format("host {} is named twice", h.host));
    hosts.push_back(std::move(h));
  }
  return hosts;
}

bool is_local_host(std::string_view host) {
  if (host == "localhost" || host == "::1" || host.starts_with("127.")) return true;
  char name[256] = {};
  if (::gethostname(name, sizeof name - 1) == 0 && host == name) return true;
  return false;
}

HostQuorum last_world_quorum(const std::vector<HostSlots>& last_members, const std::vector<HostSlots>& alive) {
  HostQuorum q;
  for (const HostSlots& m : last_members) {
    const bool answers = std::any_of(alive.begin(), alive.end(), [&](const HostSlots& a) { return a.host == m.host; });
    (answers ? q.answering : q.lost).push_back(m.host);
  }
  return q;
}

std::vector<std::vector<std::string>> checkpoint_holders(const std::vector<HostSlots>& hosts, int replicas) {
  const int n_hosts = static_cast<int>(hosts.size());
  const int k = replicas < 0 ? std::min(1, n_hosts - 1) : std::min(replicas, n_hosts - 1);
  std::vector<std::vector<std::string>> holders;
  for (int h = 0; h < n_hosts; ++h)
    for (int slot = 0; slot < hosts[static_cast<size_t>(h)].slots; ++slot) {
      std::vector<std::string> on;
      for (int i = 0; i <= k; ++i) on.push_back(hosts[static_cast<size_t>((h + i) % n_hosts)].host);
      holders.push_back(std::move(on));
    }
  return holders;
}

std::vector<HostSlots> holders_first(const std::vector<HostSlots>& alive,
                                     const std::vector<std::vector<std::string>>& holders) {
  // The fewest hosts that hold every rank's files (a smaller world then fits them), the
  // first such set in `alive`'s order; found by trying the sets of 1, 2, ... hosts (a fleet
  // of a launcher has tens of hosts at most: beyond 20 the order is kept).
  const size_t n = alive.size();
  if (n == 0 || n > 20) return alive;
  const auto holds_all = [&](const std::vector<size_t>& set) {
    return std::all_of(holders.begin(), holders.end(), [&](const std::vector<std::string>& on) {
      return std::any_of(set.begin(), set.end(), [&](size_t a) {
        return std::find(on.begin(), on.end(), alive[a].host) != on.end();
      });
    });
  };
  for (size_t k = 1; k <= n; ++k) {
    std::vector<size_t> set(k);
    for (size_t i = 0; i < k; ++i) set[i] = i;
    for (;;) {
      if (holds_all(set)) {
        std::vector<HostSlots> order;
        for (const size_t a : set) order.push_back(alive[a]);
        for (size_t a = 0; a < n; ++a)
          if (std::find(set.begin(), set.end(), a) == set.end()) order.push_back(alive[a]);
        return order;
      }
      // The next set of k indices in lexicographic order.
      size_t i = k;
      while (i > 0 && set[i - 1] == n - k + i - 1) --i;
      if (i == 0) break;
      ++set[i - 1];
      for (size_t j = i; j < k; ++j) set[j] = set[j - 1] + 1;
    }
  }
  return alive;
}

std::string HostQuorum::describe() const {
  const auto join = [](const std::vector<std::string>& names) {
    std::string s;
    for (const std::string& n : names) s += (s.empty() ? "" : ", ") + n;
    return s;
  };
  const size_t of = answering.size() + lost.size();
  return fmt::format("{} of the last world's {} host{} answer{} ({}{}{})", answering.size(), of, of == 1 ? "" : "s",
                     answering.size() == 1 ? "s" : "", join(answering), lost.empty() ? "" : "; not ", join(lost));
}

std::string ElasticShape::describe() const {
  std::string list;
  for (const HostSlots& h : hosts) list += fmt::format("{}{}:{}", list.empty() ? "" : ", ", h.host, h.slots);
  return fmt::format("{} rank{} on {} host{} ({}), {} row{} x {} micro-batch{} each = {} rows per step", world,
                     world == 1 ? "" : "s", hosts.size(), hosts.size() == 1 ? "" : "s", list, batch_size,
                     batch_size == 1 ? "" : "s", grad_accum, grad_accum == 1 ? "" : "es", global_rows());
}

std::optional<ElasticShape> plan_elastic_shape(const std::vector<HostSlots>& hosts, int max_hosts, int64_t global_rows,
                                               int64_t max_batch_size, int64_t group) {
  if (global_rows < 1 || max_batch_size < 1)
    throw InputError(kElasticComponent, fmt::format("a global batch of {} rows in micro-batches of at most {}: both must be "
                                             "at least 1",
                                             global_rows, max_batch_size));
  if (group < 1 || global_rows % group != 0)
    throw InputError(kElasticComponent, fmt::format("a global batch of {} rows is not a whole number of "
                                                    "--deterministic-group {} rows", global_rows, group));
  // In groups from here; rows again at the end.
  global_rows /= group;
  max_batch_size = std::max<int64_t>(1, max_batch_size / group);
  const size_t usable = max_hosts > 0 ? std::min(hosts.size(), static_cast<size_t>(max_hosts)) : hosts.size();
  if (usable == 0) return std::nullopt;
  int64_t slots = 0;
  for (size_t i = 0; i < usable; ++i) slots += hosts[i].slots;
  int64_t world = std::min(slots, global_rows);
  while (global_rows % world != 0) --world;  // ends at 1 at worst
  ElasticShape shape;
  shape.world = static_cast<int>(world);
  // Hosts in order, each giving what it has until the world is placed.
  int64_t left = world;
  for (size_t i = 0; i < usable && left > 0; ++i) {
    const int take = static_cast<int>(std::min<int64_t>(hosts[i].slots, left));
    shape.hosts.push_back({hosts[i].host, take});
    left -= take;
  }
  const int64_t rows = global_rows / world;
  int64_t b = std::min(rows, max_batch_size);
  while (rows % b != 0) --b;
  shape.batch_size = b * group;
  shape.grad_accum = rows / b;
  return shape;
}

}  // namespace flotilla::train
