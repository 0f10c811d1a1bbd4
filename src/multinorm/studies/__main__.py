from multinorm.studies.runner import main

raise SystemExit(main())
